from django.urls import path

from deployments.web import api, api_deployments, scaling, views

urlpatterns = [
    path("", views.deployment_list, name="deployments-index"),
    path("new/", views.deploy, name="deployment-new"),
    path("new/plan/", views.plan_preview, name="deployment-plan"),
    path("api/", api.deployments, name="deployment-api"),
    path("api/<uuid:public_id>/", api_deployments.detail, name="deployment-api-detail"),
    path("api/<uuid:public_id>/stop/", api_deployments.stop, name="deployment-api-stop"),
    path("<uuid:public_id>/", views.deployment_detail, name="deployment-detail"),
    path("<uuid:public_id>/stream/", views.deployment_stream, name="deployment-stream"),
    path("<uuid:public_id>/stop/", views.stop, name="deployment-stop"),
    path("<uuid:public_id>/restart/", views.restart, name="deployment-restart"),
    path("<uuid:public_id>/delete/", views.delete, name="deployment-delete"),
    path("<uuid:public_id>/scaling/", scaling.scaling, name="deployment-scaling"),
]
