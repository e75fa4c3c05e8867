from django.contrib import admin
from django.contrib.auth.views import LogoutView
from django.http import JsonResponse
from django.urls import include, path

from .accounts import GatewayLoginView
from .views import audit, dashboard


def health(request):
    return JsonResponse({"status": "ok"})


urlpatterns = [
    path("health", health),
    path("admin/", admin.site.urls),
    path("login/", GatewayLoginView.as_view(), name="login"),
    path("logout/", LogoutView.as_view(), name="logout"),
    path("", dashboard.dashboard, name="dashboard"),
    path("dashboard.json", dashboard.dashboard_data, name="dashboard-data"),
    path("audit/", audit.audit_list, name="audit-list"),
    path("audit/export.csv", audit.audit_export, name="audit-export"),
    path("audit/<int:pk>/", audit.audit_detail, name="audit-detail"),
    path("", include("worklist.urls")),
    path("", include("routing.urls")),
]

handler403 = "gateway.web.permission_denied"
