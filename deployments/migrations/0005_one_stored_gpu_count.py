"""One stored count: a deployment holds `gpu_count` GPUs, one tensor-parallel rank each; the
tensor-parallel size (1 for a CPU engine) is derived, no longer stored beside it."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("deployments", "0004_deployment_delete_requested_at"),
    ]

    operations = [
        migrations.RemoveField(
            model_name="deployment",
            name="tensor_parallel_size",
        ),
    ]
