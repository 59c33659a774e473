"""Beat tasks of the Home app."""

from celery import shared_task

from home import services


@shared_task(ignore_result=True)
def resources_sample() -> int:
    """Beat, every minute: a CPU, memory and disk sample for the processing graphs."""
    return services.resources_sample().minute
