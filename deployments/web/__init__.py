"""The deployment pages, the JSON API, the deploy form and the live status stream."""
