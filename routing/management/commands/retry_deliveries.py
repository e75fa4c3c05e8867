"""Retry dead (or failed) deliveries by hand, or abandon them.

    manage.py retry_deliveries --all-dead
    manage.py retry_deliveries --node PACS1            # its DEAD and FAILED deliveries, now
    manage.py retry_deliveries --id 12 13
    manage.py retry_deliveries --node OLDPACS --abandon

A retry puts the delivery back to PENDING, due now, with its attempts reset to 0 and the give-up
clock restarted; its node is enqueued once the change commits. Every change is audited.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from routing import delivery
from routing.models import Delivery, DeliveryStatus, Node
from routing.tasks import deliver_node


class Command(BaseCommand):
    help = "Retry DEAD/FAILED deliveries now (attempts reset), or abandon them with --abandon."

    def add_arguments(self, parser):
        parser.add_argument(
            "--node",
            action="append",
            default=[],
            metavar="NAME",
            help="deliveries to this node (DEAD and FAILED); repeatable",
        )
        parser.add_argument(
            "--id",
            action="extend",
            nargs="+",
            type=int,
            default=[],
            dest="ids",
            metavar="N",
            help="these deliveries",
        )
        parser.add_argument("--all-dead", action="store_true", help="every DEAD delivery")
        parser.add_argument(
            "--abandon", action="store_true", help="abandon instead (never send; PENDING ones too)"
        )
        parser.add_argument("--actor", default="system", help="who to audit (default: system)")

    def handle(self, *args, node, ids, all_dead, abandon, actor, **options):
        if not (node or ids or all_dead):
            raise CommandError("say which deliveries: --node NAME, --id N or --all-dead")
        unknown = sorted(
            set(node) - set(Node.objects.filter(name__in=node).values_list("name", flat=True))
        )
        if unknown:
            raise CommandError(f"no such node: {', '.join(unknown)}")
        selected = Delivery.objects.none()
        if node:
            selected |= Delivery.objects.filter(node__name__in=node)
        if ids:
            selected |= Delivery.objects.filter(pk__in=ids)
        if all_dead:
            selected |= Delivery.objects.filter(status=DeliveryStatus.DEAD)
        if abandon:
            done = delivery.abandon(selected, actor=actor)
            verb = "abandoned"
        else:
            done = delivery.retry_by_hand(selected, deliver_node.delay, actor=actor)
            verb = "retrying"
        self.stdout.write(
            f"{verb} {len(done)} deliveries"
            + (
                f": {', '.join(map(str, done[:50]))}{' …' if len(done) > 50 else ''}"
                if done
                else ""
            )
        )
        skipped = sorted(set(ids) - set(done))
        if skipped:
            self.stdout.write(
                f"left as they are (not in a state for this, or unknown): "
                f"{', '.join(map(str, skipped))}"
            )
