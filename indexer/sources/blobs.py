"""Layer blobs in, verified uncompressed tar streams out.

Every transport hands the build a raw blob stream; this module is the one place that
turns it into the tar stream the layer merge reads, and the one place that checks it.
Checking while streaming (instead of downloading, hashing, then reading again) keeps
multi-GB layers to a single pass and no temporary copy, at the price that a mismatch
is only known at the end of the blob. So the stream returned by :func:`open_layer`
verifies at EOF, and its :meth:`~LayerStream.close` reads whatever the consumer left
(a tar reader stops at the end-of-archive marker, before the blob's padding) and
verifies then: the build must treat ``close()`` raising :class:`SourceError` as the
layer being bad. Leaving a ``with`` block because of an exception, or dropping the
stream unclosed, releases it without reading on (nothing would use the verdict).

What is checked:

* the raw blob's size and sha256 against the descriptor, including a blob that runs
  past the descriptor's size (stopped as soon as it does);
* the compressed stream's integrity: a truncated or corrupt gzip/zstd stream is an
  error, never a silently short tar;
* the uncompressed size against a limit (``max_bytes``; ``imagefs index
  --max-layer-size``), as it streams: a decompression bomb (10 GiB of zeros in a 10 MB
  gzip blob) is refused as soon as it passes the limit instead of being decompressed
  for minutes, since neither the manifest nor the stream declares the uncompressed size;
* the config's ``diff_id`` (sha256 of the uncompressed tar), always. The raw digest
  pins the compressed bytes, but a publisher's corrupt zstd frame without a content
  checksum decompresses, deterministically, to the wrong tar: only the diff_id
  catches that, so the extra sha256 pass (~1 s of CPU per GB) is paid on every layer.
  ``Layer.verify_diff_id=False`` skips it where a caller has already checked.

Media types decide the decompressor. Layers labelled uncompressed (OCI ``...tar``,
Docker ``...diff.tar``) are sniffed by magic bytes, because ``docker save`` writes
whatever its store holds under that label. Such a layer's descriptor digest may then
name either the raw blob or (the ``docker save`` convention, where the only digest
available is the config's diff_id) its uncompressed content; both are content
addresses, so either match is accepted.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO

import zstandard

from indexer.sources import LayerBlob, SourceError

# Raw blob reads and decompressed blocks are about this size: large enough that the
# per-call Python overhead vanishes, small enough to bound memory per open layer.
BLOCK_SIZE = 1 << 20
# zstd layers are decompressed in blocks this large: the indexer cuts 1 MiB chunks
# out of them, and a chunk that lies inside one block is handed on without a copy
# (3 in 4 of them at this size).
ZSTD_BLOCK_SIZE = 4 << 20
# The most one layer may decompress to unless the caller says otherwise: larger than any
# layer seen in practice (CUDA and model layers run to tens of GB), small enough that a
# decompression bomb costs minutes of CPU at most, not hours.
DEFAULT_MAX_LAYER_BYTES = 64 << 30

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_OTHER_MAGIC = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}

DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"  # what docker save layers are labelled

# media type -> declared compression ("tar" = uncompressed, sniffed)
LAYER_MEDIA_TYPES: dict[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": "tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar": "tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}


@dataclass
class Layer(LayerBlob):
    """A :class:`LayerBlob` that also knows its config ``diff_id``.

    Transports build these; :func:`open_layer` checks ``diff_id`` unless
    ``verify_diff_id`` is turned off.
    """

    diff_id: str = ""
    verify_diff_id: bool = True


def layer_compression(media_type: str, what: str) -> str:
    """The compression a layer media type declares: ``tar``, ``gzip`` or ``zstd``."""
    kind = LAYER_MEDIA_TYPES.get(media_type)
    if kind is None:
        raise SourceError(f"{what}: unknown layer media type {media_type!r} (expected one of the OCI/Docker tar, tar+gzip or tar+zstd types)")
    return kind


def open_layer(layer: LayerBlob, max_bytes: int = DEFAULT_MAX_LAYER_BYTES) -> BinaryIO:
    """The uncompressed tar stream of ``layer``, verified as it is read (see module doc);
    it may decompress to ``max_bytes`` at most."""
    name = _layer_name(layer)
    kind = layer_compression(layer.media_type, name)
    try:
        raw = layer.opener()
    except OSError as e:
        raise SourceError(f"{name}: cannot open blob: {e}") from e
    return LayerStream(layer, raw, kind, max_bytes=max_bytes)


def _layer_name(layer: LayerBlob) -> str:
    return f"layer {layer.digest}" + (f" of {layer.source}" if layer.source else "")


class _RawReader:
    """Reads the raw blob in large blocks, counting and hashing every byte.

    At EOF it checks the size; an overlong blob fails as soon as it passes the
    descriptor's size. The digest verdict is left to :class:`LayerStream`, which may
    also know the uncompressed hash.
    """

    def __init__(self, raw: BinaryIO, size: int, name: str) -> None:
        self._raw = raw
        self._size = size
        self._name = name
        self.count = 0
        self.sha = hashlib.sha256()
        self.eof = False
        self._pending = b""

    def _read(self) -> bytes:
        try:
            data = self._raw.read(BLOCK_SIZE)
        except (OSError, ValueError, EOFError) as e:
            raise SourceError(f"{self._name}: read failed after {self.count} bytes: {e}") from e
        if data:
            self.count += len(data)
            if self.count > self._size:
                raise SourceError(f"{self._name}: size mismatch: blob is longer than the {self._size} bytes its descriptor says")
            self.sha.update(data)
        else:
            self.eof = True
            if self.count != self._size:
                raise SourceError(f"{self._name}: size mismatch: descriptor says {self._size} bytes, blob has {self.count}")
        return data

    def peek(self, n: int) -> bytes:
        """At least ``n`` leading bytes (fewer only at EOF), without consuming them."""
        while len(self._pending) < n and not self.eof:
            self._pending += self._read()
        return self._pending[:n]

    def read_block(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        if self.eof:
            return b""
        return self._read()

    def close(self) -> None:
        self._raw.close()


class _Plain:
    def __init__(self, src: _RawReader, name: str) -> None:
        self._src = src

    def next_block(self) -> bytes:
        return self._src.read_block()


class _Gzip:
    """gzip (possibly several members, as pigz and some tools write) via zlib."""

    def __init__(self, src: _RawReader, name: str) -> None:
        self._src = src
        self._name = name
        self._d = zlib.decompressobj(31)
        self._input = b""  # compressed bytes not yet handed to self._d
        self._started = False  # bytes were fed to the current member

    def next_block(self) -> bytes:
        while True:
            d = self._d
            if d.unconsumed_tail:
                data = d.unconsumed_tail
            elif self._input:
                data, self._input = self._input, b""
            else:
                data = self._src.read_block()
                if not data:
                    if self._started and not d.eof or not self._started and self._src.count == 0:
                        raise SourceError(f"{self._name}: truncated gzip stream (ends after {self._src.count} compressed bytes)")
                    return b""
            self._started = True
            try:
                out = d.decompress(data, BLOCK_SIZE)
            except zlib.error as e:
                raise SourceError(f"{self._name}: corrupt gzip stream: {e}") from e
            if d.eof:  # next member, if any, starts in unused_data
                self._input = d.unused_data
                self._d = zlib.decompressobj(31)
                self._started = False
            if out:
                return out


class _Zstd:
    """zstd (possibly several frames, skippable ones too), decompressed by zstandard's
    stream reader straight into each returned block: one native call per 4 MiB out,
    where a decompressobj fed 8 KiB slices (to bound its output) made ~128 calls per
    MiB, each handing the GIL back and forth with the tar-parsing thread, and a join
    per block (measured on the torch layer: 2.9 s of CPU with both sha256 passes,
    against 2.5 s this way).

    The stream reader returns a truncated stream silently, so a :class:`_FrameWalker`
    follows the frame and block headers of the compressed bytes as they pass: the
    blob must end between two frames. Corrupt content is zstd's to catch (with a frame
    checksum, or through the diff_id); the output per read is bounded by the block size
    whatever the compression ratio."""

    def __init__(self, src: _RawReader, name: str) -> None:
        self._src = src
        self._name = name
        self._walker = _FrameWalker(name)
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            _WalkedSource(src, self._walker), read_size=BLOCK_SIZE, read_across_frames=True
        )

    def next_block(self) -> bytes:
        try:
            out = self._reader.read(ZSTD_BLOCK_SIZE)
        except zstandard.ZstdError as e:
            raise SourceError(f"{self._name}: corrupt zstd stream: {e}") from e
        if not out:
            if self._src.count == 0 or not self._walker.between_frames:
                raise SourceError(f"{self._name}: truncated zstd stream (ends after {self._src.count} compressed bytes)")
        return out


class _WalkedSource:
    """The raw blob as the zstd stream reader reads it, shown to a frame walker on the way."""

    def __init__(self, src: _RawReader, walker: "_FrameWalker") -> None:
        self._src = src
        self._walker = walker

    def read(self, n: int = -1) -> bytes:
        data = self._src.read_block()
        if data:
            self._walker.feed(data)
        return data


_ZSTD_FRAME_MAGIC = 0xFD2FB528
_SKIPPABLE_MASK, _SKIPPABLE_MAGIC = 0xFFFFFFF0, 0x184D2A50


class _FrameWalker:
    """Follows zstd's frame layout (RFC 8878, section 3.1) over the compressed bytes
    without decoding them: frame magic, frame header, then block headers (3 bytes:
    last-block flag, type, size) and the bodies they announce, then the optional
    content checksum; skippable frames are a magic, a length and that many bytes.
    ``between_frames`` says whether the bytes so far end exactly after a whole frame.
    A few header reads per ~100 KiB block, so its cost is negligible."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._state = "magic"  # what the next header bytes are
        self._want = 4  # header bytes the state needs
        self._head = b""  # header bytes gathered so far
        self._skip = 0  # body bytes to pass over before the next header
        self._checksum = False
        self._last = False

    @property
    def between_frames(self) -> bool:
        return self._state == "magic" and not self._head and not self._skip

    def _corrupt(self, what: str) -> SourceError:
        return SourceError(f"{self._name}: corrupt zstd stream: {what}")

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                if self._skip == 0 and self._state == "after-last-block":
                    self._begin("magic", 4)
                continue
            take = min(self._want - len(self._head), end - pos)
            self._head += data[pos:pos + take]
            pos += take
            if len(self._head) == self._want:
                head, self._head = self._head, b""
                self._header(head)

    def _begin(self, state: str, want: int) -> None:
        self._state, self._want = state, want

    def _header(self, head: bytes) -> None:
        state = self._state
        if state == "magic":
            magic = int.from_bytes(head, "little")
            if magic == _ZSTD_FRAME_MAGIC:
                self._begin("frame-header", 1)
            elif magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
                self._begin("skippable-size", 4)
            else:
                raise self._corrupt(f"no zstd frame magic (0x{magic:08x})")
        elif state == "skippable-size":
            self._skip = int.from_bytes(head, "little")
            self._begin("after-last-block", 0)
            if not self._skip:
                self._begin("magic", 4)
        elif state == "frame-header":
            fhd = head[0]
            if fhd & 0x08:
                raise self._corrupt("reserved bit set in a frame header")
            single_segment = bool(fhd & 0x20)
            self._checksum = bool(fhd & 0x04)
            rest = (0 if single_segment else 1) + (0, 1, 2, 4)[fhd & 3] + ((1 if single_segment else 0), 2, 4, 8)[fhd >> 6]
            self._skip = rest
            self._begin("block-header", 3)
        elif state == "block-header":
            value = int.from_bytes(head, "little")
            last, kind, size = value & 1, (value >> 1) & 3, value >> 3
            if kind == 3:
                raise self._corrupt("reserved block type")
            self._skip = 1 if kind == 1 else size  # RLE blocks hold one byte
            if last:
                self._skip += 4 if self._checksum else 0
                self._begin("after-last-block", 0)
                if not self._skip:
                    self._begin("magic", 4)
        else:  # pragma: no cover - "after-last-block" only waits for its skip to end
            raise AssertionError(state)


_DECODERS: dict[str, Any] = {"tar": _Plain, "gzip": _Gzip, "zstd": _Zstd}


class LayerStream(io.BufferedIOBase):
    """A layer's uncompressed tar bytes; raises :class:`SourceError` on any mismatch.

    ``read(n)`` returns exactly ``n`` bytes until EOF. Reaching EOF verifies; so does
    :meth:`close`, after reading the rest (see the module doc).
    """

    def __init__(self, layer: LayerBlob, raw: BinaryIO, kind: str, *,
                 max_bytes: int = DEFAULT_MAX_LAYER_BYTES) -> None:
        super().__init__()
        self._layer = layer
        self._max_bytes = max_bytes
        self._out = 0  # uncompressed bytes so far
        self._name = name = _layer_name(layer)
        self._src = src = _RawReader(raw, layer.size, name)
        self._error: BaseException | None = None
        self._verified = False
        self._buf = b""
        self._pos = 0
        declared_plain = kind == "tar"
        if declared_plain:
            try:
                kind = self._sniff()
            except BaseException:
                src.close()
                raise
        self.compression = kind
        diff_id = getattr(layer, "diff_id", "") or ""
        self._diff_id = diff_id
        # An uncompressed hash is needed to check a known diff_id (when asked to, or
        # when free) and to accept the docker-save digest convention (module doc).
        self._digest_may_be_uncompressed = declared_plain and kind != "tar"
        self._usha: Any = None
        if kind != "tar" and (self._digest_may_be_uncompressed or diff_id and getattr(layer, "verify_diff_id", False)):
            self._usha = hashlib.sha256()
        self._decoder = _DECODERS[kind](src, name)

    # -- reading ------------------------------------------------------------------

    def _sniff(self) -> str:
        head = self._guard(self._src.peek, 6)
        if head.startswith(GZIP_MAGIC):
            return "gzip"
        if head.startswith(ZSTD_MAGIC):
            return "zstd"
        for magic, what in _OTHER_MAGIC.items():
            if head.startswith(magic):
                raise SourceError(f"{self._name}: blob is {what}-compressed, which OCI images do not allow (only gzip or zstd)")
        return "tar"

    def _guard(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except BaseException as e:
            self._error = e
            raise

    def _next(self) -> bytes:
        """The next decompressed block; b"" at EOF, after verifying. A stream that
        failed keeps failing: a short read must never pass for the end of the tar."""
        if self._error is not None:
            raise self._error
        if self._verified:
            return b""
        block = self._guard(self._decoder.next_block)
        if block:
            self._out += len(block)
            if self._out > self._max_bytes:
                self._guard(self._too_large)
            if self._usha is not None:
                self._usha.update(block)
            return block
        self._guard(self._verify)
        return b""

    def _too_large(self) -> None:
        raise SourceError(
            f"{self._name}: decompresses to more than {self._max_bytes} bytes (after {self._src.count} of its "
            f"{self._layer.size} {self.compression} bytes): refused as a likely decompression bomb; if the "
            f"layer is genuine, raise the limit (imagefs index --max-layer-size)")

    def _verify(self) -> None:
        raw_digest = "sha256:" + self._src.sha.hexdigest()
        if self._usha is not None:
            udigest = "sha256:" + self._usha.hexdigest()
        elif self.compression == "tar":
            udigest = raw_digest
        else:
            udigest = ""
        want = self._layer.digest
        if raw_digest != want and not (self._digest_may_be_uncompressed and udigest == want):
            got = raw_digest if not self._digest_may_be_uncompressed else f"{raw_digest} (uncompressed {udigest})"
            raise SourceError(f"{self._name}: digest mismatch: descriptor says {want}, blob is {got}")
        if self._diff_id and udigest and udigest != self._diff_id:
            raise SourceError(
                f"{self._name}: diff_id mismatch: image config says {self._diff_id}, uncompressed layer is {udigest}"
                + (f" (a corrupt {self.compression} stream?)" if self.compression != "tar" else "")
            )
        self._verified = True

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read of closed layer stream")
        if size is None or size < 0:
            parts = [self._buf[self._pos:]]
            while block := self._next():
                parts.append(block)
            self._buf, self._pos = b"", 0
            return b"".join(parts)
        avail = len(self._buf) - self._pos
        if avail >= size:
            out = self._buf[self._pos: self._pos + size]
            self._pos += size
            return out
        parts = [self._buf[self._pos:]] if avail else []
        got = avail
        self._buf, self._pos = b"", 0
        while got < size:
            block = self._next()
            if not block:
                break
            need = size - got
            if len(block) > need:
                parts.append(block[:need])
                self._buf, self._pos = block, need
                break
            parts.append(block)
            got += len(block)
        return b"".join(parts)

    def read1(self, size: int = -1) -> bytes:
        if self._pos >= len(self._buf):
            self._buf, self._pos = self._next(), 0
        if size < 0:
            size = len(self._buf) - self._pos
        out = self._buf[self._pos: self._pos + size]
        self._pos += len(out)
        return out

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        n = len(data)
        memoryview(b).cast("B")[:n] = data
        return n

    def readable(self) -> bool:
        return True

    # -- ending -------------------------------------------------------------------

    def close(self) -> None:
        """Read what is left, verify it all, release the blob. Raises
        :class:`SourceError` if the layer is bad, unless a read already raised it
        (then it only releases); later calls do nothing."""
        if self.closed:
            return
        if self._error is not None:
            self._release()
            return
        try:
            while self._next():
                pass
        finally:
            self._release()

    def _release(self) -> None:
        if not self.closed:
            try:
                self._src.close()
            finally:
                super().close()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self._release()  # an error already ends this layer: do not read on
        else:
            self.close()

    def __del__(self) -> None:
        try:
            self._release()
        except Exception:
            pass

    @property
    def bytes_read(self) -> int:
        """Raw (compressed) bytes read from the blob so far."""
        return self._src.count
