"""Example saga applications built on compensa's public API (`sagas.app.SagaApp`)."""
