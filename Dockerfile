# The Airflow image of the canary-rollouts stack: the official Airflow 3.3 image (Python 3.11) plus this
# project's pinned dependencies, DAGs, plugins and include/ (gateway, simulator, demo models, specs).
# docker-compose builds it once and runs every Airflow service, the gateway, the demo-model training and the
# simulator from it (see docs/deploy.md). In development docker-compose mounts dags/, plugins/, include/ over
# the copies baked in here, so edits show up without a rebuild.
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_IMAGE}

USER airflow
WORKDIR /opt/airflow

# requirements.txt pins apache-airflow==3.3.2, the version the base image already has: fail the build with a
# clear message if the two ever disagree instead of letting pip up- or downgrade Airflow inside the image.
COPY --chown=airflow:0 requirements.txt constraints.txt /opt/airflow/requirements/
RUN grep -qx "apache-airflow==${AIRFLOW_VERSION}" /opt/airflow/requirements/requirements.txt \
    || { echo "requirements.txt must pin apache-airflow==${AIRFLOW_VERSION} (the base image's version);" \
              "change AIRFLOW_IMAGE or the pin so they match" >&2; exit 1; } \
 && pip install --no-cache-dir \
        "apache-airflow==${AIRFLOW_VERSION}" \
        -r /opt/airflow/requirements/requirements.txt \
        -c /opt/airflow/requirements/constraints.txt

# include/ holds the gateway, simulator and demo models as importable packages; plugins/ holds `canary`.
ENV PYTHONPATH=/opt/airflow/include:/opt/airflow/plugins \
    GX_ANALYTICS_ENABLED=False \
    AIRFLOW__CORE__LOAD_EXAMPLES=False

COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
COPY --chown=airflow:0 include/ /opt/airflow/include/

# Mount points of the named volumes (created here so new volumes start with this ownership): var/models the
# model directory, var/gateway the gateway's spill file, reports/ the HTML rollout reports, auth/ the simple
# auth manager's password file. Group 0 may write, as in the official image, so any AIRFLOW_UID works.
RUN mkdir -p /opt/airflow/var/models /opt/airflow/var/gateway /opt/airflow/reports /opt/airflow/auth \
 && chmod -R g+rwX /opt/airflow/var /opt/airflow/reports \
 && chmod 0770 /opt/airflow/auth
