"""The ground floor every app builds on: queues and the job class that carries the request
context into jobs, the request context and its middleware. Imports no other Berth app."""
