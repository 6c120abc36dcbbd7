"""Trip booking: flight, car, hotel, each booked by its own participant and cancelled to compensate.

`examples.trip.app:app` is the application object; docs/tutorial.md builds it step by step.
"""
