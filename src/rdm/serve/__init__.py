"""``rdm serve``: a JSON API and one page to search a database and generate from it.

- :mod:`rdm.serve.app`  the FastAPI app (:func:`create_app`), its limits and security guards, and
  :func:`serving` (uvicorn in a background thread, for tests and notebooks)
- :mod:`rdm.serve.jobs` generation jobs and the queue that runs them one at a time
- ``static/``           the page: plain HTML, JavaScript and CSS, no build step, nothing from a CDN

See docs/serve.md for the routes, the limits and the measured load.
"""

from rdm.serve.app import Limits, create_app, serving

__all__ = ["Limits", "create_app", "serving"]
