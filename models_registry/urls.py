from django.urls import path

from models_registry import views

urlpatterns = [
    path("", views.model_list, name="models-index"),
    path("register/", views.register, name="model-register"),
    path("register/preview/", views.register_preview, name="model-register-preview"),
    path("<int:pk>/", views.model_detail, name="model-detail"),
    path("<int:pk>/inspect/", views.reinspect, name="model-reinspect"),
    path("mounts/<int:pk>/sync/", views.sync, name="mount-sync"),
]
