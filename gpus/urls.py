from django.urls import path

from gpus import views

urlpatterns = [
    path("", views.index, name="gpus-index"),
    path("hosts/<str:name>/", views.host_detail, name="gpus-host"),
    path("hosts/<str:name>/<int:index>/", views.gpu_detail, name="gpus-gpu"),
]
