"""Django's admin stays for superusers only, signs in through the same throttled form as the
product, and audits what it changes (users and their roles included)."""

from django.contrib import admin
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group, User

from .accounts import ThrottledAuthenticationForm
from .audit import AuditedAdmin, ReadOnlyAdmin
from .models import AuditEvent


class AdminSignInForm(ThrottledAuthenticationForm, AdminAuthenticationForm):
    """The product's throttling, then the admin's own staff check."""


def _superusers_only(request) -> bool:
    return request.user.is_active and request.user.is_superuser


admin.site.has_permission = _superusers_only
admin.site.login_form = AdminSignInForm
admin.site.site_header = "Radiology gateway: superuser administration"


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin, admin.ModelAdmin):
    list_display = ("at", "actor", "action", "object_type", "object_repr")
    list_filter = ("action",)
    search_fields = ("actor", "object_repr", "object_id")


admin.site.unregister(User)
admin.site.unregister(Group)


@admin.register(User)
class AuditedUserAdmin(AuditedAdmin, UserAdmin):
    """Users and their roles (groups); the password itself is never recorded."""


@admin.register(Group)
class AuditedGroupAdmin(AuditedAdmin, GroupAdmin):
    pass
