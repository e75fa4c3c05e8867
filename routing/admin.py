"""Django's admin, for superusers (the product's pages are the way to work). Rules are checked
with the same :func:`routing.rules.validate_rule` that config import uses; every change is
audited; what was received and delivered is read-only."""

from django import forms
from django.contrib import admin

from gateway.audit import AuditedAdmin, ReadOnlyAdmin

from .config import validate_ae_title
from .models import Delivery, DicomAssociation, Node, ReceivedInstance, ReceivedStudy, Rule
from .rules import validate_rule


class NodeForm(forms.ModelForm):
    class Meta:
        model = Node
        fields = ("name", "ae_title", "host", "port", "enabled", "max_associations")

    def clean_ae_title(self):
        value = self.cleaned_data["ae_title"]
        if problem := validate_ae_title(value):
            raise forms.ValidationError(problem)
        return value

    def clean_port(self):
        port = self.cleaned_data["port"]
        if not 1 <= port <= 65535:
            raise forms.ValidationError("must be 1-65535")
        return port


@admin.register(Node)
class NodeAdmin(AuditedAdmin, admin.ModelAdmin):
    form = NodeForm
    list_display = ("name", "ae_title", "host", "port", "enabled", "max_associations",
                    "last_echo_ok_at", "last_echo_error")
    list_filter = ("enabled",)
    search_fields = ("name", "ae_title", "host")


class RuleForm(forms.ModelForm):
    class Meta:
        model = Rule
        fields = ("name", "order", "enabled", "match", "conditions", "destinations", "coerce",
                  "stop", "mode", "study_quiet_seconds")

    def clean(self):
        data = super().clean()
        document = {
            key: data[key]
            for key in ("name", "order", "enabled", "match", "conditions", "coerce", "stop",
                        "mode", "study_quiet_seconds")
            if key in data and data[key] is not None
        }
        for problem in validate_rule(document):
            field = problem.split(":")[0].split("[")[0].split(".")[0]
            self.add_error(field if field in self.fields else None, problem)
        return data


@admin.register(Rule)
class RuleAdmin(AuditedAdmin, admin.ModelAdmin):
    form = RuleForm
    list_display = ("order", "name", "enabled", "match", "mode", "stop")
    list_display_links = ("name",)
    list_filter = ("enabled", "mode")
    search_fields = ("name",)
    filter_horizontal = ("destinations",)


@admin.register(DicomAssociation)
class DicomAssociationAdmin(ReadOnlyAdmin, admin.ModelAdmin):
    list_display = ("started_at", "calling_ae", "called_ae", "peer", "instances", "failures",
                    "result", "ended_at")
    list_filter = ("result",)
    search_fields = ("calling_ae", "peer")


@admin.register(ReceivedStudy)
class ReceivedStudyAdmin(ReadOnlyAdmin, admin.ModelAdmin):
    list_display = ("accession_number", "patient_id", "patient_name", "study_date",
                    "modalities", "last_received_at", "study_routed_at")
    search_fields = ("study_instance_uid", "accession_number", "patient_id")


@admin.register(ReceivedInstance)
class ReceivedInstanceAdmin(ReadOnlyAdmin, admin.ModelAdmin):
    list_display = ("sop_instance_uid", "calling_ae", "sop_class_uid", "transfer_syntax_uid",
                    "received_at", "version", "routing_status")
    list_filter = ("routing_status", "calling_ae")
    search_fields = ("sop_instance_uid", "series_instance_uid", "study__study_instance_uid")
    list_select_related = ("study",)
    raw_id_fields = ("study", "association")


@admin.register(Delivery)
class DeliveryAdmin(ReadOnlyAdmin, admin.ModelAdmin):
    list_display = ("instance", "node", "rule_name", "instance_version", "status", "attempts",
                    "next_attempt_at", "delivered_at", "last_error")
    list_filter = ("status", "node")
    search_fields = ("instance__sop_instance_uid", "rule_name")
    list_select_related = ("instance", "node")
    raw_id_fields = ("instance", "rule")
