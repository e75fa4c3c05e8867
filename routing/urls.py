from django.urls import path

from .views import nodes, rules, studies

urlpatterns = [
    path("nodes/", nodes.node_list, name="node-list"),
    path("nodes/new", nodes.node_create, name="node-create"),
    path("nodes/<int:pk>/", nodes.node_edit, name="node-edit"),
    path("nodes/<int:pk>/delete", nodes.node_delete, name="node-delete"),
    path("nodes/<int:pk>/toggle", nodes.node_toggle, name="node-toggle"),
    path("nodes/<int:pk>/verify", nodes.node_verify, name="node-verify"),
    path("nodes/<int:pk>/retry-failed", studies.node_retry_failed, name="node-retry-failed"),
    path("rules/", rules.rule_list, name="rule-list"),
    path("rules/new", rules.rule_create, name="rule-create"),
    path("rules/test", rules.rule_test, name="rule-test"),
    path("rules/<int:pk>/", rules.rule_edit, name="rule-edit"),
    path("rules/<int:pk>/delete", rules.rule_delete, name="rule-delete"),
    path("rules/<int:pk>/toggle", rules.rule_toggle, name="rule-toggle"),
    # POST direction=up|down
    path("rules/<int:pk>/move", rules.rule_move, name="rule-move"),
    path("studies/", studies.study_list, name="study-list"),
    path("studies/<int:pk>/", studies.study_detail, name="study-detail"),
    path("deliveries/", studies.delivery_list, name="delivery-list"),
    path("deliveries/<int:pk>/retry", studies.delivery_retry, name="delivery-retry"),
    path("deliveries/<int:pk>/abandon", studies.delivery_abandon, name="delivery-abandon"),
]
