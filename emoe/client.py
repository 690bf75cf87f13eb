"""A small synchronous Python client for the Frontend's gRPC API (`emoe.v1.Inference`).

    with InferenceClient("127.0.0.1:50051") as client:
        for part in client.generate("Hello", max_tokens=8):
            print(part.text, end="")
        print(client.complete(prompt_token_ids=[1, 2, 3], temperature=0.7, seed=1).finish_reason)

Responses are the generated protobuf messages (`emoe.v1.inference_pb2`). Server errors surface as
`grpc.RpcError` (`.code()`, `.details()`; the details name the offending field).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from emoe.v1 import inference_pb2 as pb
from emoe.v1 import inference_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
SAMPLING_FIELDS = frozenset(pb.SamplingParams.DESCRIPTOR.fields_by_name)


class InferenceClient:
    """Connects to `address` ("host:port"); TLS when `tls_root_cert` (PEM bytes) is given.

    `token` is sent as metadata `authorization: Bearer <token>` on every call; each call has a
    deadline of `timeout_s` seconds (a stream: for the whole stream).
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls_root_cert: bytes | None = None,
        timeout_s: float = 60.0,
    ):
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if tls_root_cert is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=tls_root_cert)
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s

    def generate(
        self,
        prompt: str | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        *,
        request_id: str = "",
        **sampling: Any,
    ) -> Iterator[pb.GenerateResponse]:
        """Streams the completion: new token_ids and text per message; the last has finish_reason and usage.

        `sampling` takes the fields of `emoe.v1.SamplingParams` (max_tokens, temperature, top_p, top_k,
        seed, stop, stop_token_ids, ignore_eos); an unknown name raises TypeError. Closing the iterator
        early (e.g. `break`) cancels the request on the server.
        """
        request = _request(prompt, prompt_token_ids, request_id, sampling)
        call = self._stub.Generate(request, timeout=self.timeout_s, metadata=self._metadata)
        try:
            yield from call
        finally:
            call.cancel()

    def complete(
        self,
        prompt: str | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        *,
        request_id: str = "",
        **sampling: Any,
    ) -> pb.GenerateResponse:
        """The whole completion in one message (all token_ids, text, finish_reason, usage)."""
        request = _request(prompt, prompt_token_ids, request_id, sampling)
        return self._stub.Complete(request, timeout=self.timeout_s, metadata=self._metadata)

    def tokenize(self, text: str) -> list[int]:
        reply = self._stub.Tokenize(
            pb.TokenizeRequest(text=text), timeout=self.timeout_s, metadata=self._metadata
        )
        return list(reply.token_ids)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        request = pb.DetokenizeRequest(token_ids=list(token_ids))
        return self._stub.Detokenize(request, timeout=self.timeout_s, metadata=self._metadata).text

    def model_info(self) -> pb.ModelInfo:
        return self._stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=self.timeout_s, metadata=self._metadata
        )

    def cancel(self, request_id: str) -> None:
        """Stops a running request; raises grpc.RpcError NOT_FOUND when no such request is running."""
        self._stub.Cancel(
            pb.CancelRequest(request_id=request_id), timeout=self.timeout_s, metadata=self._metadata
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _request(
    prompt: str | None, prompt_token_ids: Sequence[int] | None, request_id: str, sampling: dict[str, Any]
) -> pb.GenerateRequest:
    unknown = sorted(set(sampling) - SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameters {unknown}; known: {sorted(SAMPLING_FIELDS)}")
    params = pb.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    return pb.GenerateRequest(
        prompt=prompt or "",
        prompt_token_ids=list(prompt_token_ids or ()),
        sampling=params,
        request_id=request_id,
    )
