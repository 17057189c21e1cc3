"""onnxserve's server: a KServe V2 front end over a transport-neutral data plane.

Package map, by layer (each may import the layers below it, never those above; errors,
settings, types and onnxserve.protos are shared by all, observability is used by all and
imports none; tests/unit/project/test_layers.py checks this):

    cli.py, workers.py      the `onnxserve` command; `serve --workers N`'s supervisor
    commands/               client commands: demo, health
    server.py               composition root: start-up, serve, shut down as named phases
    frontends/              grpc_service (the RPCs), decoding, encoding, auth, health;
                            http_service (the REST routes), http_extensions (the
                            extensions' routes), http_answers (JSON, error statuses),
                            http_body (body limit, codings), http_codec (JSON and binary
                            tensors), http_server (bind, serve, drain, stop),
                            wrong_protocol (gRPC or TLS clients at the HTTP port);
                            native/: transport.cc (gRPC C++ carries the calls and
                            bytes) and server (NativeServer: the same servicers over it)
    dataplane.py            live/ready/metadata/config/statistics/repository/infer on plain
                            values, declared in contract.py (no onnxruntime, no models/);
                            handlers.py: the repository, logging and trace extensions
                            beside it; classification.py formats top-k results;
                            shared_memory.py: Triton's system shared memory regions
    models/                 repository, listing, config_support, options, validation, images,
                            external_data, warmup, model (Model, ModelVersion), loader
                            (load_model), registry
    batching/               scheduler (admission, forming batches), queue (deadlines,
                            policy), assembly (batches, buffers, padding, splitting),
                            dispatch (running a batch, answering each request), inflight
    runtime/                instance (an instance's onnxruntime session), plan and
                            accelerators (how a model's instances run), sessions, providers,
                            devices, pinned, topk, kernels/
    observability/          metrics, statistics, logs, accounting
    errors.py settings.py types.py process.py

The request path: frontends/grpc_service.ModelInfer (or each request of ModelStreamInfer)
-> frontends/decoding.infer_request -> dataplane.DataPlane.infer (models/registry lookup,
models/validation, decode, models/images off the loop, models/model reshape)
-> batching/scheduler.Scheduler.infer (batching/queue, batching/assembly)
-> batching/dispatch -> runtime/instance.SessionInstance.run (in a worker thread) -> split
back per request -> dataplane (classification strings) -> frontends/encoding
.encode_response. Over HTTP: frontends/http_service.infer -> frontends/http_body.read_body
-> frontends/http_codec.infer_request -> the same data plane -> http_codec.infer_response.

The lifecycle path: cli -> workers.run_server -> server.Server.serve, in three phases:
startup (bind the gRPC, HTTP and metrics ports, listen) -> main_loop
(models/registry.load_initial: models/loader.load_model in a thread, in named steps: read,
choose versions, plan, then per version instances, config, warm-up, scheduler; then ready,
serve, and wait for the stop) -> shutdown (drain, linger, close, exit).

Threads: the asyncio event loop runs both front ends (grpc.aio and aiohttp), the data
plane, the registry and the schedulers' batch forming (and, for models chosen to run on the
event loop, their runs); one thread per model instance runs onnxruntime (which releases the
GIL); a pool decodes encoded images; model loads run in a thread (asyncio.to_thread);
gRPC's own poller thread and the Prometheus HTTP server's thread serve their sockets.
With the native gRPC transport, gRPC C++'s threads receive and send the calls: they never
run Python or take the GIL; they queue each call's events under a mutex and wake the event
loop through an eventfd, and the loop's thread takes the events and answers (read, write,
finish: they record what is asked under the call's mutex and queue the gRPC operation for
the transport's sender thread, which starts it, so gRPC's inline work, encoding and the
socket's sendmsg, is not done on the event loop's thread). A call object lives until gRPC
is done with it and no Python operation is using it or waits to be started
(transport.cc's Transport::Use), so a late answer to a call that ended is dropped, never a
use after free. Stopping joins the sender after gRPC's server has waited for every call.
The server ends by exiting the process (server._exit_process), and stopping the transport
never waits for Python, so no transport thread can run into a finalising interpreter. The
transport starts after the process's last fork (--workers N spawns workers; each starts
its own).
"""
