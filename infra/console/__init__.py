"""The operator console (`compensa console`): server-rendered pages over sagas and dead letters.

`app.create_app` builds it (FastAPI, Jinja2 templates from `templates/`, plain JS from
`static/`); `security` holds sign-in sessions, CSRF tokens and form parsing;
`actions` the operator actions (each audited); `timeline` draws a saga's history as SVG.
"""
