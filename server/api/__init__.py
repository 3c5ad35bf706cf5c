"""One translation module per API over the serving core (server/serving.py): wire request →
``GenerationRequest``; generation events → the API's bodies and stream events."""
