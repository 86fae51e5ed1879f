"""agent-integrations: a Celery backend that calls external services for AI agents.

This package is the library: configuration, the kinds of service, the HTTP choke point, the
ledger, webhooks and the command-line tool's reading commands. It never imports the Celery app;
``tasks`` (the app layer) does the submitting: ``from tasks import call_service``.
"""
