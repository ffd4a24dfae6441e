"""The WhatsApp exporter's monitoring mixin: the one source of the Prometheus recording rules,
the alerts and the Grafana dashboards.

    python -m mixin           writes prometheus/rules.yml, prometheus/alerts.yml and
                              grafana/dashboards/*.json
    python -m mixin --check   writes nothing; exits 1 if any of them would change

Parameters (the selector, the delivery objective, the runbook URL, thresholds) are in
mixin/config.py; `python -m mixin --help` shows how to render a copy with others.
"""
