"""Schemathesis hooks for tests/service/test_schemathesis.py (and a run by hand: ``SCHEMATHESIS_HOOKS=
tests.service.schemathesis_hooks st --config-file tests/service/schemathesis.toml run ...``).

``positive_data_acceptance`` expects 422 for schema-valid data in schemathesis.toml because some of this API's
rules cannot be written in JSON Schema: a job config's cross-field rules (``schemas/job.py``'s model validators:
``inner.optimizer`` 'sgd' for the baselines, model.arch vs tasks.family, ranges low <= high, ...), references
to other resources (a dataset id that must exist, a model's module names and input shape), and the contents of
an uploaded file. The check below keeps the rest of that check's meaning: a schema-valid request may be refused
only for such a reason, never for one the document could have stated (a missing field, a wrong type, a bound,
a pattern, an unknown field): those come back as pydantic errors with their own ``type``, while model
validators give ``value_error``, the API's own checks give no ``type``, and admission by cost (a job whose
estimated memory, compute or checkpoint bytes is above the deployment's limits, api/routes/jobs.py) gives ``cost``:
a limit of the deployment, set by its settings, not of the schema.
"""
import schemathesis

SEMANTIC = (None, "value_error", "cost")


@schemathesis.check
def refused_only_for_rules_the_schema_cannot_state(ctx, response, case):
    meta = case.meta
    if response.status_code != 422 or meta is None or not meta.generation.mode.is_positive:
        return None
    try:
        errors = response.json().get("errors") or []
    except Exception:
        raise AssertionError(f"a 422 without a problem+json body: {response.text[:200]}")
    schema_errors = [e for e in errors if e.get("type") not in SEMANTIC]
    if schema_errors or not errors:
        raise AssertionError("schema-valid request refused for a reason the schema could state: "
                             f"{schema_errors or response.text[:300]}")
    return None
