"""Quality of service in the ingress: priorities and deadlines (``gate``), per-key quotas (``quotas``),
SLOs with their burn rates and the remediation they switch on (``slo``)."""
