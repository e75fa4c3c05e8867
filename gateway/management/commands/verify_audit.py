"""Check the audit trail's hash chain: every event's hash must follow from the one before.
Exit status 0 when it is intact, 1 with the first broken link otherwise."""

from django.core.management.base import BaseCommand, CommandError

from gateway import audit


class Command(BaseCommand):
    help = "Verify the audit trail's hash chain and report the first broken link."

    def handle(self, *args, **options):
        count, broken = audit.verify()
        if broken is None:
            last = audit.last_event()
            self.stdout.write(f"Audit trail intact: {count} events, every hash follows from "
                              "the one before.")
            if last:
                # A chain cannot show that its newest events were removed: keep this line
                # somewhere else (a ticket, a log server) and compare it later.
                self.stdout.write(f"Last event {last[0]} at {last[1]:%Y-%m-%d %H:%M:%S}, hash "
                                  f"{last[2]}")
            return
        after = (f"event {broken['previous_id']}" if broken["previous_id"] is not None
                 else "the start of the trail")
        raise CommandError(
            f"Audit trail broken at event {broken['id']} ({broken['at']:%Y-%m-%d %H:%M:%S} "
            f"{broken['action']} by {broken['actor']}): its hash does not follow from {after}. "
            f"Stored {broken['hash'] or '(none)'}, expected {broken['expected']}. "
            f"{count - 1} events before it are intact; the row was changed, or a row before "
            "it was removed."
        )
