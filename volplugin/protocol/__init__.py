"""The Docker volume plugin protocol (v1): the Flask app and its access log."""
