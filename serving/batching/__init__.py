"""Batching: per model version, the queue, admission, deadlines, batch forming, buffers,
padding to buckets, and splitting outputs back to the requests (checking their rows).

Runs on the event loop; the batches themselves run on an instance (serving/types.py's
``Instance`` protocol: batching never imports the runtime).
"""
