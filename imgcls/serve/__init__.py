"""``imgcls serve``: the HTTP server (the optional extra ``imgcls[serve]``).

- :mod:`imgcls.serve.model`: the predictor behind it, predict's decode, forward
  and records (the one inference path);
- :mod:`imgcls.serve.batching`: the bounded queue and the one thread that runs the model;
- :mod:`imgcls.serve.uploads`: request bodies, capped and parsed in memory;
- :mod:`imgcls.serve.app`: routes, errors, API key, metrics; ``page.html`` / ``page.js``: the page;
- :mod:`imgcls.serve.server`: uvicorn, signals and the drain.

Imports the predictor and explain, never training.
"""

from __future__ import annotations

MISSING_EXTRA = "imgcls serve needs the serve extra: pip install 'imgcls[serve]'"


def missing_packages() -> list[str]:
    """The packages of the serve extra this environment lacks (import names)."""
    import importlib.util

    wanted = ("fastapi", "uvicorn", "prometheus_client", "python_multipart")
    return [name for name in wanted if importlib.util.find_spec(name) is None]
