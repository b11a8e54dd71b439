"""Validate an uploaded dataset while it streams in, one chunk of bytes at a time.

What is accepted (decisions a user may ask about):

- UTF-8 only; a UTF-8 byte order mark is skipped, a UTF-16 one is refused with a hint.
- JSONL (one example per line, LF or CRLF endings) for every format; a single top-level JSON
  array for the LLaMA-Factory formats (alpaca, sharegpt) only, as OpenAI accepts chat and
  preference data only as JSONL.
- Blank lines are skipped rather than refused: they carry no data, editors add them, and
  line numbers in errors still count them. A file of only blank lines is ``empty_file``.
- A key repeated within one object, NaN/Infinity and lone surrogate escapes are refused
  (see ``parse``): what the trainer reads later must be exactly what was validated.
- The format comes from the first example (or ``expected_format``); every later example
  must have the same format.
- A chat file in which no example has an assistant message with weight 1 is refused as
  ``no_trainable_examples``: training on it would learn nothing. Single examples whose
  assistant turns all carry weight 0 are fine (they can hold context).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

from common.datasets.base import (
    DEFAULT_LIMITS,
    DatasetFormat,
    DatasetSummary,
    ValidationLimits,
)
from common.datasets.errors import DatasetError, ErrorCode, RecordError, json_type, show
from common.datasets.formats import check_record, detect_format
from common.datasets.parse import parse_record
from common.datasets.splitter import Layout, RawRecord, StreamSplitter

Example = tuple[DatasetFormat, dict[str, Any]]

READ_CHUNK_BYTES = 1024 * 1024

_FORMAT_HINT = (
    "expected 'messages' (chat), 'input' with 'preferred_output' and "
    "'non_preferred_output' (dpo), 'instruction' and 'output' (alpaca) or "
    "'conversations' (sharegpt)"
)


class StreamingValidator:
    """Feed the file's bytes in chunks of any size, then call ``finish()``.

    ``feed`` raises DatasetError as soon as a problem is certain; after an error every call
    raises that same error again.
    """

    def __init__(
        self,
        limits: ValidationLimits = DEFAULT_LIMITS,
        expected_format: DatasetFormat | None = None,
    ) -> None:
        self._limits = limits
        self._expected = expected_format
        self._splitter = StreamSplitter(limits.max_line_bytes)
        self._format: DatasetFormat | None = None
        self._examples = 0
        self._trained = 0
        self._bytes = 0
        self._input_ended = False
        self._finished = False
        self._error: DatasetError | None = None

    def feed(self, chunk: bytes) -> None:
        self.feed_examples(chunk)

    def feed_examples(self, chunk: bytes) -> list[Example]:
        """Like ``feed``, returning the examples completed by this chunk."""
        self._check_open()
        try:
            room = self._limits.max_file_bytes - self._bytes
            self._bytes += len(chunk)
            # Examples before the limit are checked first, so that the error reported
            # does not depend on how the file was cut into chunks.
            examples = [self._accept(raw) for raw in self._splitter.feed(chunk[:room])]
            if len(chunk) > room:
                raise DatasetError(
                    f"the file is larger than the limit of {self._limits.max_file_bytes} bytes",
                    ErrorCode.FILE_TOO_LARGE,
                    None,
                )
            return examples
        except DatasetError as err:
            self._error = err
            raise

    def end_examples(self) -> list[Example]:
        """Mark the end of the input; return the example on an unterminated last line."""
        self._check_open()
        if self._input_ended:
            return []
        self._input_ended = True
        try:
            return [self._accept(raw) for raw in self._splitter.finish()]
        except DatasetError as err:
            self._error = err
            raise

    def finish(self) -> DatasetSummary:
        """End the input and check the file as a whole; return what it holds."""
        self.end_examples()
        self._finished = True
        try:
            return self._summary()
        except DatasetError as err:
            self._error = err
            raise

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self._finished:
            raise RuntimeError("the validator is finished; create a new one")

    def _summary(self) -> DatasetSummary:
        limits = self._limits
        if self._format is None or self._examples == 0:
            raise DatasetError("the file contains no examples", ErrorCode.EMPTY_FILE, None)
        if self._examples < limits.min_examples:
            raise DatasetError(
                f"the file has {self._examples} example"
                f"{'' if self._examples == 1 else 's'}; at least {limits.min_examples} "
                "are required",
                ErrorCode.TOO_FEW_EXAMPLES,
                None,
            )
        if self._trained == 0:
            raise DatasetError(
                "no example has an assistant message with weight 1, so there is "
                "nothing to train on",
                ErrorCode.NO_TRAINABLE_EXAMPLES,
                None,
            )
        return DatasetSummary(self._format, self._examples, self._bytes)

    def _accept(self, raw: RawRecord) -> Example:
        value = parse_record(raw)
        where = raw.where()
        if not isinstance(value, dict):
            per = "line of a JSONL file" if raw.index is None else "element of the array"
            raise DatasetError(
                f"{where}: expected a JSON object (one example), got "
                f"{json_type(value)}; each {per} must be one object",
                ErrorCode.NOT_AN_OBJECT,
                raw.line,
            )
        self._examples += 1
        if self._examples > self._limits.max_examples:
            raise DatasetError(
                f"{where}: the file has more than {self._limits.max_examples} examples",
                ErrorCode.TOO_MANY_EXAMPLES,
                raw.line,
            )
        fmt = self._resolve_format(value, raw)
        try:
            trained = check_record(fmt, value)
        except RecordError as err:
            raise DatasetError(f"{where}: {err.detail}", err.code, raw.line) from None
        self._trained += trained
        return fmt, value

    def _resolve_format(self, obj: dict[str, Any], raw: RawRecord) -> DatasetFormat:
        where = raw.where()
        detected = detect_format(obj)
        fmt = self._format or self._expected
        if fmt is None:
            if detected is None:
                raise DatasetError(
                    f"{where}: cannot tell the dataset format from the keys of this "
                    f"example ({_keys(obj)}); {_FORMAT_HINT}",
                    ErrorCode.UNRECOGNIZED_FORMAT,
                    raw.line,
                )
            fmt = detected
        elif detected is not None and detected != fmt:
            if self._expected is not None:
                raise DatasetError(
                    f"{where}: expected an example in the {fmt} format, but this one "
                    f"is in the {detected} format",
                    ErrorCode.FORMAT_MISMATCH,
                    raw.line,
                )
            raise DatasetError(
                f"{where}: this example is in the {detected} format, but the ones "
                f"before it are in the {fmt} format; all examples in a file must have "
                "one format",
                ErrorCode.MIXED_FORMATS,
                raw.line,
            )
        if self._format is None:
            if self._splitter.layout is Layout.ARRAY and fmt in (
                DatasetFormat.CHAT,
                DatasetFormat.DPO,
            ):
                raise DatasetError(
                    f"{where}: {fmt} examples must be uploaded as JSONL (one JSON object "
                    "per line), not as a JSON array",
                    ErrorCode.ARRAY_NOT_SUPPORTED,
                    raw.line,
                )
            self._format = fmt
        return fmt


def _keys(obj: dict[str, Any]) -> str:
    if not obj:
        return "it is an empty object"
    shown = ", ".join(show(key) for key in list(obj)[:5])
    more = f" and {len(obj) - 5} more" if len(obj) > 5 else ""
    return f"found {shown}{more}"


def validate_bytes_iter(
    chunks: Iterable[bytes],
    limits: ValidationLimits = DEFAULT_LIMITS,
    expected_format: DatasetFormat | None = None,
) -> DatasetSummary:
    """Validate a dataset given as an iterable of byte chunks."""
    validator = StreamingValidator(limits, expected_format)
    for chunk in chunks:
        validator.feed(chunk)
    return validator.finish()


def _read_chunks(path: str | os.PathLike[str]) -> Iterator[bytes]:
    with open(path, "rb") as file:
        while chunk := file.read(READ_CHUNK_BYTES):
            yield chunk


def validate_path(
    path: str | os.PathLike[str],
    limits: ValidationLimits = DEFAULT_LIMITS,
    expected_format: DatasetFormat | None = None,
) -> DatasetSummary:
    """Validate a dataset file, reading it in 1 MiB chunks."""
    return validate_bytes_iter(_read_chunks(path), limits, expected_format)


def iter_examples(
    chunks: Iterable[bytes],
    limits: ValidationLimits = DEFAULT_LIMITS,
    expected_format: DatasetFormat | None = None,
) -> Iterator[Example]:
    """Yield ``(format, example)`` for each example, validating as it goes.

    The whole-file checks (too few examples, nothing to train) run after the last example
    has been yielded, so a consumer must read to the end before trusting the data; files
    that were validated at upload pass them anyway.
    """
    validator = StreamingValidator(limits, expected_format)
    for chunk in chunks:
        yield from validator.feed_examples(chunk)
    yield from validator.end_examples()
    validator.finish()
