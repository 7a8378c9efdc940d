"""containerd's gRPC API, the parts imagefs speaks: generated Python from the .proto
files in this directory.

The .proto files are imagefs's own, written from containerd 1.6's published API
(``api/services/{snapshots,content,images,leases,diff}/v1`` and ``api/types``): package,
service, message and field names and numbers are containerd's, so the bytes on the wire
are what containerd sends and expects; only the RPCs and messages imagefs uses are
declared. The PyPI package ``containerd`` (1.5.3, 2021) is not used: its modules were
made by a protoc older than 3.19 and do not import under the protobuf 4+ runtimes that
grpcio needs today ("Descriptors cannot be created directly").

The ``*_pb2.py``/``*_pb2_grpc.py`` modules are generated, not committed:
``tools/install.sh`` runs ``tools/gen_containerd_api.sh`` (grpcio-tools' protoc) after
it installs the Python dependencies. Generated code checks at import that the protobuf
runtime is at least the version that generated it, so code generated here, against the
runtime installed here, always imports; checked-in code would pin every machine to the
protobuf of whoever generated it last (protobuf itself marks its output "NO CHECKED-IN
PROTOBUF GENCODE").
"""
