from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from config import metrics, views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("healthz", views.healthz, name="healthz"),
    path("metrics", metrics.metrics, name="metrics"),
    path(
        "accounts/login/",
        auth_views.LoginView.as_view(redirect_authenticated_user=True),
        name="login",
    ),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("teams/", include("accounts.urls")),
    path("audit/", include("audit.urls")),
    path("gpus/", include("gpus.urls")),
    path("models/", include("models_registry.urls")),
    path("deployments/", include("deployments.web.urls")),
    path("gateway/", include("gateway.urls")),
    path("admin/", admin.site.urls),
]

admin.site.site_header = "Berth administration"
admin.site.site_title = "Berth admin"
