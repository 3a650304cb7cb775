from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0007_worker_nodes"),
    ]

    operations = [
        migrations.AddField(
            model_name="job",
            name="search",
            field=models.JSONField(
                blank=True,
                help_text="A floor search or sweep (floor, budget, presets), or null for one run.",
                null=True,
            ),
        ),
    ]
