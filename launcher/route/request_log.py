"""What the front door served: the last requests' records (GET /requests) and the request metrics
(/metrics), both taken from one request's answer."""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable, Iterator

from launcher.route.metrics import RequestMetrics
from launcher.route.off_loop import for_body
from launcher.route.served import Served
from launcher.route.usage import Tokens, of_body
from launcher.schema_front_door import RequestRecord

_RECORDS_KEPT = 500


class RequestLog:
    """``load``: (model, instance, in flight, queued) for each instance, read by the metrics."""

    def __init__(self, load: Callable[[], Iterator[tuple[str, str, int, int]]]) -> None:
        self.records: deque[RequestRecord] = deque(maxlen=_RECORDS_KEPT)
        self.metrics = RequestMetrics(load)

    async def record(self, model: str, method: str, path: str, arrived: str, served: Served, duration_s: float) -> None:
        answer = served.answer
        tokens = Tokens()
        if answer is not None:  # a plain answer's usage is read from all of it (4 MiB at most)
            tokens = await for_body(answer.kept, functools.partial(of_body, answer.kept, answer.streamed))
        per_s = tokens.per_s
        if per_s is None and tokens.generated and answer is not None and answer.ttfb_s is not None:
            generating_s = duration_s - answer.ttfb_s
            per_s = tokens.generated / generating_s if generating_s > 0 and answer.streamed else None
        ttfb_s = answer.ttfb_s if answer is not None else None
        self.metrics.observe(model, served.instance, served.status, duration_s, ttfb_s, tokens, per_s)
        self.records.append(
            RequestRecord(
                time=arrived,
                model=model,
                instance=served.instance,
                method=method,
                path=path,
                status=served.status,
                streamed=answer.streamed if answer is not None else False,
                ttfb_ms=None if ttfb_s is None else round(ttfb_s * 1000, 3),
                duration_ms=round(duration_s * 1000, 3),
                prompt_tokens=tokens.prompt,
                generated_tokens=tokens.generated,
                tokens_per_s=None if per_s is None or not math.isfinite(per_s) else round(per_s, 2),
            )
        )
