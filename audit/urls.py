from django.urls import path

from audit import views

urlpatterns = [
    path("", views.review, name="audit-review"),
    path("export.csv", views.export, {"fmt": "csv"}, name="audit-export-csv"),
    path("export.jsonl", views.export, {"fmt": "jsonl"}, name="audit-export-jsonl"),
    path("verify/", views.request_verification, name="audit-verify"),
    path("verify/status/", views.verification_status, name="audit-verify-status"),
    path("events/<int:seq>/", views.event_detail, name="audit-event"),
]
