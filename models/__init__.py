"""The shipped models as package data: installed as the package `capsnet.models` (setup.py maps this
directory to that name), so a wheel carries `capsnet-mnist/` and the service finds it with
importlib.resources wherever it is installed (see capsnet.service.settings.SHIPPED_MODEL)."""
