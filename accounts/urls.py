from django.urls import path

from accounts import views

urlpatterns = [
    path("", views.team_list, name="team-list"),
    path("<slug:slug>/", views.team_detail, name="team-detail"),
]
