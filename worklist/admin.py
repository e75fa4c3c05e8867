"""Django's admin, for superusers: the product's pages are the way to work; here the tables
the pages don't edit (stations, status mappings) and a raw view. Every change is audited;
messages and queries are records and stay read-only."""

from django.contrib import admin

from gateway.audit import AuditedAdmin, ReadOnlyAdmin

from .models import (
    HL7Message,
    ImagingOrder,
    OrderStatusMapping,
    Patient,
    ScheduledStep,
    Station,
    WorklistQuery,
)


@admin.register(Patient)
class PatientAdmin(AuditedAdmin, admin.ModelAdmin):
    list_display = ("patient_id", "issuer", "name", "birth_date", "sex", "merged_into")
    search_fields = ("patient_id", "name_key")


class ScheduledStepInline(admin.TabularInline):
    model = ScheduledStep
    extra = 0


@admin.register(ImagingOrder)
class ImagingOrderAdmin(AuditedAdmin, admin.ModelAdmin):
    list_display = ("accession_number", "patient", "requested_procedure_description", "status")
    list_filter = ("status",)
    search_fields = ("accession_number", "placer_order_number", "filler_order_number")
    list_select_related = ("patient",)
    raw_id_fields = ("patient", "last_message")
    inlines = [ScheduledStepInline]


@admin.register(ScheduledStep)
class ScheduledStepAdmin(AuditedAdmin, admin.ModelAdmin):
    list_display = ("sps_id", "modality", "station_ae_title", "start", "status", "order")
    list_filter = ("status", "modality")
    search_fields = ("sps_id", "station_ae_title", "order__accession_number")
    list_select_related = ("order",)
    raw_id_fields = ("order",)


@admin.register(Station)
class StationAdmin(AuditedAdmin, admin.ModelAdmin):
    list_display = ("ae_title", "station_name", "modality", "location", "enabled")


@admin.register(OrderStatusMapping)
class OrderStatusMappingAdmin(AuditedAdmin, admin.ModelAdmin):
    list_display = ("order_control", "order_status", "step_status")


@admin.register(HL7Message)
class HL7MessageAdmin(ReadOnlyAdmin, admin.ModelAdmin):
    list_display = ("received_at", "message_type", "control_id", "sending_application", "status")
    list_filter = ("status", "message_type")
    search_fields = ("control_id", "patient_id", "sending_application")
    readonly_fields = [f.name for f in HL7Message._meta.fields]


@admin.register(WorklistQuery)
class WorklistQueryAdmin(ReadOnlyAdmin, admin.ModelAdmin):
    list_display = ("at", "calling_ae", "peer", "answers", "status")
    readonly_fields = [f.name for f in WorklistQuery._meta.fields]
