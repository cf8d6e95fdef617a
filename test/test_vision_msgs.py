"""vision_msgs built from interfaces/: field-for-field 4.1.x, serialisable, and usable over DDS.

The expected field lists and RIHS01 type hashes below are vision_msgs 4.1.1 (ros2 branch) as
upstream defines and generates them. A type hash covers every field name and type of a message
and of everything it nests, so equal hashes mean wire- and introspection-compatible with a
ROS 2 machine that uses the distribution's vision_msgs.
"""

import json
from pathlib import Path
import re
import time
import xml.etree.ElementTree as ET

from ament_index_python.packages import get_package_share_directory
import pytest

REPO = Path(__file__).resolve().parents[1]
INTERFACE_DIR = REPO / 'interfaces' / 'vision_msgs'
MSG_DIR = INTERFACE_DIR / 'msg'
HEADER = ('std_msgs/Header', 'header')

# Upstream vision_msgs 4.1.1: message -> [(type, name)] in declaration order, package-qualified.
EXPECTED_FIELDS: dict[str, list[tuple[str, str]]] = {
    'BoundingBox2D': [
        ('vision_msgs/Pose2D', 'center'), ('float64', 'size_x'), ('float64', 'size_y')],
    'BoundingBox2DArray': [HEADER, ('vision_msgs/BoundingBox2D[]', 'boxes')],
    'BoundingBox3D': [('geometry_msgs/Pose', 'center'), ('geometry_msgs/Vector3', 'size')],
    'BoundingBox3DArray': [HEADER, ('vision_msgs/BoundingBox3D[]', 'boxes')],
    'Classification': [HEADER, ('vision_msgs/ObjectHypothesis[]', 'results')],
    'Detection2D': [
        HEADER, ('vision_msgs/ObjectHypothesisWithPose[]', 'results'),
        ('vision_msgs/BoundingBox2D', 'bbox'), ('string', 'id')],
    'Detection2DArray': [HEADER, ('vision_msgs/Detection2D[]', 'detections')],
    'Detection3D': [
        HEADER, ('vision_msgs/ObjectHypothesisWithPose[]', 'results'),
        ('vision_msgs/BoundingBox3D', 'bbox'), ('string', 'id')],
    'Detection3DArray': [HEADER, ('vision_msgs/Detection3D[]', 'detections')],
    'LabelInfo': [HEADER, ('vision_msgs/VisionClass[]', 'class_map'), ('float32', 'threshold')],
    'ObjectHypothesis': [('string', 'class_id'), ('float64', 'score')],
    'ObjectHypothesisWithPose': [
        ('vision_msgs/ObjectHypothesis', 'hypothesis'),
        ('geometry_msgs/PoseWithCovariance', 'pose')],
    'Point2D': [('float64', 'x'), ('float64', 'y')],
    'Pose2D': [('vision_msgs/Point2D', 'position'), ('float64', 'theta')],
    'VisionClass': [('uint16', 'class_id'), ('string', 'class_name')],
    'VisionInfo': [
        HEADER, ('string', 'method'), ('string', 'database_location'),
        ('int32', 'database_version')],
}

# RIHS01 hashes generated upstream from vision_msgs 4.1.1 (rosidl_generator_c *__description.c).
# BoundingBox2DArray / BoundingBox3DArray are checked through their field lists only.
UPSTREAM_RIHS01: dict[str, str] = {
    'BoundingBox2D': '008eacbb0cf8f26e83795547bed013eec3675485ef386ec056d80eaaf1c1ce2f',
    'BoundingBox3D': 'bbb73a65c163d7f9bb29009c7bde9f7faa576bd2d23299c4511d19230dab4698',
    'Classification': 'f74db28d0eaef3afb78f48bf2161cd709a1383a0309d3454383b25be11345143',
    'Detection2D': '0d12b69df5c593b3455b7346fac8205437a7d4bcb09b9e0e0b2dde787ded38ea',
    'Detection2DArray': '214274120007f4a683866481336b70310268cfa107aebe9d594a6acf75bda968',
    'Detection3D': 'ddd703be132ab0b69d33121f1bb034132bfbb3b0ac5f9fb1516005ba1c8a265b',
    'Detection3DArray': '793f5eab9595ac1c0da07873cc859db42eae51f0ee76056db8562515d830e018',
    'LabelInfo': '3d37df4015cdf660cc851c51897f2acd957e1ca6205ba0a99aebffb9406b0783',
    'ObjectHypothesis': '51da43cec11c01957a64d1e05a24acd18aae7745ec30b74348ad5f6d634f7f90',
    'ObjectHypothesisWithPose':
        '41c12344c0396c48b81df12467c192d99b2a0eb1463c5c37194e4223251c80bc',
    'Point2D': 'eab0e83f44ab4de92ceaf76dd7d0e7638f2bdd1d16ffbe16c7a136c48e407247',
    'Pose2D': 'b0b5d1d7b4c20dd4fcde3ed1d4b289a919290572007d67a97043814db25d3648',
    'VisionClass': '1e4a11f0fed50b5623cb8ff26ca0e37952a48a9c074d16f804b44e9164c2037a',
    'VisionInfo': '95d3116a17484ad91c9a2686e1d54890bbfc3ff6c6a2de137738c4950d45d284',
}

PRIMITIVES = {
    'bool', 'byte', 'char', 'float32', 'float64', 'int8', 'uint8', 'int16', 'uint16', 'int32',
    'uint32', 'int64', 'uint64', 'string', 'wstring'}


def parse_msg(path: Path) -> list[tuple[str, str]]:
    """[(package-qualified type, name)] of the fields in a .msg file; constants are rejected."""
    fields = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split('#', 1)[0].strip()
        if not line:
            continue
        assert '=' not in line, f'{path}:{lineno}: vision_msgs 4.1.x defines no constants'
        type_name, name, *default = line.split()
        assert not default, f'{path}:{lineno}: vision_msgs 4.1.x defines no default values'
        base, suffix = re.fullmatch(r'([\w/]+)(\[[^\]]*\])?', type_name).groups()
        if base not in PRIMITIVES and '/' not in base:
            base = f'vision_msgs/{base}'  # same-package reference
        fields.append((base + (suffix or ''), name))
    return fields


def built_share() -> Path:
    """share/vision_msgs of the built package, found through the ament index."""
    try:
        return Path(get_package_share_directory('vision_msgs'))
    except Exception as exc:  # PackageNotFoundError or a missing AMENT_PREFIX_PATH
        pytest.fail(f'vision_msgs is not built into this venv ({exc}); '
                    'run bash scripts/setup_env.sh')


def built_hash(name: str) -> str:
    """RIHS01 hash of a built message, from the type description rosidl installs beside it."""
    path = built_share() / 'msg' / f'{name}.json'
    hashes = json.loads(path.read_text())['type_hashes']
    entry = next(h for h in hashes if h['type_name'] == f'vision_msgs/msg/{name}')
    return entry['hash_string']


def rosbags_typestore():
    """A rosbags Kilted typestore with our .msg files registered, as bag writers build it."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    typestore = get_typestore(Stores.ROS2_KILTED)
    types = {}
    for path in sorted(MSG_DIR.glob('*.msg')):
        types.update(get_types_from_msg(path.read_text(), f'vision_msgs/msg/{path.stem}'))
    typestore.register(types)
    return typestore


def test_msg_files_are_field_for_field_vision_msgs_4_1():
    found = {path.stem for path in MSG_DIR.glob('*.msg')}
    assert found == set(EXPECTED_FIELDS), f'extra: {found - set(EXPECTED_FIELDS)}, ' \
                                          f'missing: {set(EXPECTED_FIELDS) - found}'
    for name, expected in EXPECTED_FIELDS.items():
        assert parse_msg(MSG_DIR / f'{name}.msg') == expected, name


def test_interface_package_is_a_rosidl_package():
    cmake = (INTERFACE_DIR / 'CMakeLists.txt').read_text()
    listed = re.findall(r'msg/(\w+)\.msg', cmake)
    assert sorted(listed) == sorted(EXPECTED_FIELDS), 'CMakeLists.txt msg_files out of step'
    assert 'rosidl_generate_interfaces(' in cmake

    root = ET.parse(INTERFACE_DIR / 'package.xml').getroot()
    assert root.get('format') == '3'
    assert root.findtext('name') == 'vision_msgs'
    assert root.findtext('version').startswith('4.1.')
    assert root.findtext('member_of_group') == 'rosidl_interface_packages'
    buildtool = {e.text for e in root.iter('buildtool_depend')}
    assert {'ament_cmake', 'rosidl_default_generators'} <= buildtool
    depends = {e.text for e in root.iter('depend')} | {e.text for e in root.iter('exec_depend')}
    assert {'std_msgs', 'geometry_msgs', 'rosidl_default_runtime'} <= depends
    assert root.find('export/build_type').text == 'ament_cmake'
    # colcon/rosdep must skip this copy on ROS machines, where the distro's package is used.
    assert (REPO / 'interfaces' / 'COLCON_IGNORE').is_file()


def test_built_types_hash_like_upstream():
    for name, expected in UPSTREAM_RIHS01.items():
        assert built_hash(name) == f'RIHS01_{expected}', name


def test_built_types_are_the_checked_in_definitions():
    # Guards against a stale build: the installed descriptions must list our current fields.
    for name, expected in EXPECTED_FIELDS.items():
        description = json.loads((built_share() / 'msg' / f'{name}.json').read_text())
        fields = description['type_description_msg']['type_description']['fields']
        assert [f['name'] for f in fields] == [n for _, n in expected], name


def test_rosbags_registration_matches_the_build():
    # Bag writers register these same .msg files with rosbags; its hashes go into bag metadata.
    typestore = rosbags_typestore()
    for name in EXPECTED_FIELDS:
        assert typestore.hash_rihs01(f'vision_msgs/msg/{name}') == built_hash(name), name


def make_detections():
    """A Detection2DArray with two tracked detections, every level of nesting filled in."""
    from vision_msgs.msg import Detection2D, Detection2DArray, ObjectHypothesisWithPose

    msg = Detection2DArray()
    msg.header.stamp.sec = 1_700_000_000
    msg.header.stamp.nanosec = 123_456_789
    msg.header.frame_id = 'camera_optical_frame'
    for track_id, (cx, cy, w, h, score) in enumerate(
            [(320.5, 240.25, 64.0, 48.0, 0.875), (10.0, 20.0, 4.5, 3.0, 0.25)], start=7):
        det = Detection2D()
        det.header = msg.header
        det.id = f'track-{track_id}'
        det.bbox.center.position.x = cx
        det.bbox.center.position.y = cy
        det.bbox.center.theta = 0.125
        det.bbox.size_x = w
        det.bbox.size_y = h
        hyp = ObjectHypothesisWithPose()
        hyp.hypothesis.class_id = 'object'
        hyp.hypothesis.score = score
        hyp.pose.pose.position.z = 2.5
        hyp.pose.covariance[0] = 0.01
        det.results.append(hyp)
        msg.detections.append(det)
    return msg


def assert_same_detections(got, want) -> None:
    assert got.header.frame_id == want.header.frame_id
    assert (got.header.stamp.sec, got.header.stamp.nanosec) == \
           (want.header.stamp.sec, want.header.stamp.nanosec)
    assert len(got.detections) == len(want.detections)
    for g, w in zip(got.detections, want.detections, strict=True):
        assert g.id == w.id
        assert g.header.frame_id == w.header.frame_id
        assert (g.bbox.center.position.x, g.bbox.center.position.y, g.bbox.center.theta) == \
               (w.bbox.center.position.x, w.bbox.center.position.y, w.bbox.center.theta)
        assert (g.bbox.size_x, g.bbox.size_y) == (w.bbox.size_x, w.bbox.size_y)
        assert len(g.results) == len(w.results) == 1
        assert g.results[0].hypothesis.class_id == w.results[0].hypothesis.class_id
        assert g.results[0].hypothesis.score == w.results[0].hypothesis.score
        assert g.results[0].pose.pose.position.z == w.results[0].pose.pose.position.z
        assert list(g.results[0].pose.covariance) == list(w.results[0].pose.covariance)


@pytest.mark.ros
def test_detection2d_array_serialisation_round_trip():
    from rclpy.serialization import deserialize_message, serialize_message
    from vision_msgs.msg import Detection2DArray

    msg = make_detections()
    raw = serialize_message(msg)
    assert_same_detections(deserialize_message(raw, Detection2DArray), msg)

    # The same CDR bytes decode with rosbags from our .msg files (what bag tools will do).
    decoded = rosbags_typestore().deserialize_cdr(raw, 'vision_msgs/msg/Detection2DArray')
    assert [d.id for d in decoded.detections] == ['track-7', 'track-8']
    assert decoded.detections[0].bbox.center.position.x == 320.5
    assert decoded.detections[1].results[0].hypothesis.score == 0.25


@pytest.mark.ros
def test_detection2d_array_pub_sub_over_loopback(rclpy_context, ros_domain_id):
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from vision_msgs.msg import Detection2DArray

    assert rclpy_context.get_domain_id() == ros_domain_id
    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    received = []
    pub_node = Node('vision_msgs_test_pub', context=rclpy_context)
    sub_node = Node('vision_msgs_test_sub', context=rclpy_context)
    executor = SingleThreadedExecutor(context=rclpy_context)
    try:
        publisher = pub_node.create_publisher(Detection2DArray, 'detections', qos)
        sub_node.create_subscription(Detection2DArray, 'detections', received.append, qos)
        executor.add_node(pub_node)
        executor.add_node(sub_node)
        sent = make_detections()
        # Discovery takes a moment even in-process; keep publishing until the first arrival.
        deadline = time.monotonic() + 15.0
        while not received and time.monotonic() < deadline:
            publisher.publish(sent)
            executor.spin_once(timeout_sec=0.1)
        assert received, 'no Detection2DArray arrived within 15 s'
        assert_same_detections(received[0], sent)
    finally:
        executor.shutdown()
        pub_node.destroy_node()
        sub_node.destroy_node()
