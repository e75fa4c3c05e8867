from django.urls import path

from .views import messages, worklist

urlpatterns = [
    path("worklist/", worklist.step_list, name="worklist-list"),
    path("worklist/<int:pk>/", worklist.step_detail, name="worklist-detail"),
    # POST action=cancel|complete
    path("worklist/<int:pk>/status", worklist.step_set_status, name="worklist-set-status"),
    path("hl7/", messages.message_list, name="hl7-list"),
    path("hl7/<int:pk>/", messages.message_detail, name="hl7-detail"),
    path("hl7/<int:pk>/reprocess", messages.message_reprocess, name="hl7-reprocess"),
]
