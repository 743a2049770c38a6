from django.urls import path

from gateway import views

urlpatterns = [
    path("teams/<slug:slug>/", views.team_gateway, name="gateway-team"),
    path("teams/<slug:slug>/usage.csv", views.team_usage_csv, name="gateway-team-usage-csv"),
    path("keys/<uuid:public_id>/revoke/", views.revoke, name="gateway-key-revoke"),
    path("keys/<uuid:public_id>/rotate/", views.rotate, name="gateway-key-rotate"),
    path("models/<int:pk>/", views.model_usage, name="gateway-model-usage"),
]
