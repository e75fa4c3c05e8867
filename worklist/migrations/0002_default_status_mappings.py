from django.db import migrations

# ORC-1 order control / ORC-5 order status -> Scheduled Procedure Step status.
# Administrators may add rows; a pair with no row is refused with AE, never dropped.
# ORC-5 values are HL7 table 0038; "A" there means "some, but not all, results available",
# i.e. the procedure is under way, not that the patient has arrived.
DEFAULTS = [
    ("NW", "", "SCHEDULED"),
    ("NW", "SC", "SCHEDULED"),
    ("NW", "IP", "SCHEDULED"),
    ("XO", "", "SCHEDULED"),
    ("XO", "SC", "SCHEDULED"),
    ("XO", "IP", "STARTED"),
    ("XO", "A", "STARTED"),
    ("XO", "CM", "COMPLETED"),
    ("SC", "SC", "SCHEDULED"),
    ("SC", "A", "STARTED"),
    ("SC", "IP", "STARTED"),
    ("SC", "CM", "COMPLETED"),
    ("SC", "CA", "CANCELLED"),
    ("SC", "DC", "DISCONTINUED"),
    ("CA", "", "CANCELLED"),
    ("CA", "CA", "CANCELLED"),
    ("OC", "", "CANCELLED"),
    ("OC", "CA", "CANCELLED"),
    ("DC", "", "DISCONTINUED"),
    ("DC", "DC", "DISCONTINUED"),
    ("OD", "", "DISCONTINUED"),
    ("OD", "DC", "DISCONTINUED"),
]


def add_defaults(apps, schema_editor):
    Mapping = apps.get_model("worklist", "OrderStatusMapping")
    for control, status, step_status in DEFAULTS:
        Mapping.objects.get_or_create(
            order_control=control, order_status=status, defaults={"step_status": step_status}
        )


class Migration(migrations.Migration):
    dependencies = [("worklist", "0001_initial")]
    operations = [migrations.RunPython(add_defaults, migrations.RunPython.noop)]
