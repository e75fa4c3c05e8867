"""Django admin for superusers until the product pages (UI issue) exist."""

from django.contrib import admin

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
class PatientAdmin(admin.ModelAdmin):
    list_display = ("patient_id", "issuer", "name", "birth_date", "sex", "merged_into")
    search_fields = ("patient_id", "name_key")


class ScheduledStepInline(admin.TabularInline):
    model = ScheduledStep
    extra = 0


@admin.register(ImagingOrder)
class ImagingOrderAdmin(admin.ModelAdmin):
    list_display = ("accession_number", "patient", "requested_procedure_description", "status")
    list_filter = ("status",)
    search_fields = ("accession_number", "placer_order_number", "filler_order_number")
    list_select_related = ("patient",)
    raw_id_fields = ("patient", "last_message")
    inlines = [ScheduledStepInline]


@admin.register(ScheduledStep)
class ScheduledStepAdmin(admin.ModelAdmin):
    list_display = ("sps_id", "modality", "station_ae_title", "start", "status", "order")
    list_filter = ("status", "modality")
    search_fields = ("sps_id", "station_ae_title", "order__accession_number")
    list_select_related = ("order",)
    raw_id_fields = ("order",)


@admin.register(Station)
class StationAdmin(admin.ModelAdmin):
    list_display = ("ae_title", "station_name", "modality", "location", "enabled")


@admin.register(OrderStatusMapping)
class OrderStatusMappingAdmin(admin.ModelAdmin):
    list_display = ("order_control", "order_status", "step_status")


@admin.register(HL7Message)
class HL7MessageAdmin(admin.ModelAdmin):
    list_display = ("received_at", "message_type", "control_id", "sending_application", "status")
    list_filter = ("status", "message_type")
    search_fields = ("control_id", "patient_id", "sending_application")
    readonly_fields = [f.name for f in HL7Message._meta.fields]


@admin.register(WorklistQuery)
class WorklistQueryAdmin(admin.ModelAdmin):
    list_display = ("at", "calling_ae", "peer", "answers", "status")
    readonly_fields = [f.name for f in WorklistQuery._meta.fields]
