# The console's image: one image for web, worker and beat (docker-compose.yml picks the command).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DJANGO_SETTINGS_MODULE=lmi.settings
WORKDIR /app
COPY pyproject.toml ./
COPY . .
RUN pip install --no-cache-dir -e . && useradd --system --home /app lmi && mkdir -p /data && chown lmi /data
USER lmi
EXPOSE 8000 2525
CMD ["gunicorn", "lmi.wsgi:application", "--bind", "0.0.0.0:8000"]
