from django.urls import path

import upgrades.return_views as return_views
from upgrades import install_views, rehearsal_views, schedule_views, validation_views, views

app_name = "upgrades"
urlpatterns = [
    path("licensing/", views.index, name="index"),
    path("licensing/download/", views.download, name="download"),
    path("licensing/download/progress/", views.download_partial, name="download_partial"),
    path("licensing/cancel/", views.cancel, name="cancel"),
    path("licensing/story/", views.story_partial, name="story_partial"),
    path("licensing/check/", views.check, name="check"),
    path("licensing/settings/", views.update_settings, name="settings"),
    path("licensing/license/", views.license_upload, name="license"),
    path("licensing/logs/<str:name>/", views.update_log, name="update_log"),
    # Install (issue 6): the preflight checklist, the run's progress, abort, and the fixes the
    # checklist offers (pin a DHCP address, download a configuration backup).
    path("licensing/install/", install_views.install_checklist, name="install"),
    path("licensing/install/start/", install_views.install_start, name="install_start"),
    path("licensing/install/<int:run_id>/", install_views.install_run, name="install_run"),
    path(
        "licensing/install/banner/",
        install_views.install_banner_watch,
        name="install_banner_watch",
    ),
    path(
        "licensing/install/<int:run_id>/banner/",
        install_views.install_banner,
        name="install_banner",
    ),
    path(
        "licensing/install/<int:run_id>/progress/",
        install_views.install_run_partial,
        name="install_run_partial",
    ),
    path(
        "licensing/install/<int:run_id>/abort/",
        install_views.install_abort,
        name="install_abort",
    ),
    # The validation report written after a successful install (issue 18).
    path(
        "licensing/install/<int:run_id>/validation.json",
        validation_views.validation_json,
        name="validation_json",
    ),
    path(
        "licensing/install/<int:run_id>/validation/",
        validation_views.validation_print,
        name="validation_print",
    ),
    path("licensing/install/pin/", install_views.install_pin_interface, name="install_pin"),
    path("licensing/install/unpin/", install_views.install_unpin_interface, name="install_unpin"),
    path("licensing/install/backup/", install_views.install_config_backup, name="install_backup"),
    # Rehearse the install's conversion on a snapshot of the appliance (issue 18).
    path("licensing/install/rehearse/", rehearsal_views.rehearsal_start, name="rehearsal_start"),
    path(
        "licensing/install/rehearse/panel/",
        rehearsal_views.rehearsal_partial,
        name="rehearsal_partial",
    ),
    path(
        "licensing/install/rehearse/cancel/",
        rehearsal_views.rehearsal_cancel,
        name="rehearsal_cancel",
    ),
    # Return to the previous firmware within the retention period (issue 18).
    path("licensing/install/return/", return_views.return_confirm, name="return_confirm"),
    # Install at a time (issue 18).
    path("licensing/install/schedule/", schedule_views.schedule_set, name="schedule_set"),
    path("licensing/install/schedule/move/", schedule_views.schedule_move, name="schedule_move"),
    path(
        "licensing/install/schedule/cancel/", schedule_views.schedule_cancel, name="schedule_cancel"
    ),
]
