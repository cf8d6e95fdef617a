"""rosbag2 reading (training/bags.py) and image payload decoding (moog_ros/image_codecs.py).

The node-side wrappers of the same decoder (``conversions.image_to_rgb`` / ``compressed_to_rgb``)
are tested with rclpy messages in test_conversions.py; here it is fed rosbags messages and raw
fields.

Bags are written here with rosbags' Writer (sqlite3 and MCAP), with header stamps deliberately
out of bag-time order, and read back through the public API.
"""
from pathlib import Path
import pickle

import cv2
import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from moog_ros import image_codecs
from moog_ros.training import bags

TS = get_typestore(Stores.ROS2_KILTED)
Image = TS.types['sensor_msgs/msg/Image']
CompressedImage = TS.types['sensor_msgs/msg/CompressedImage']
CameraInfo = TS.types['sensor_msgs/msg/CameraInfo']
Header = TS.types['std_msgs/msg/Header']
Time = TS.types['builtin_interfaces/msg/Time']
STORAGES = {'sqlite3': StoragePlugin.SQLITE3, 'mcap': StoragePlugin.MCAP}


def header(stamp_ns: int, frame_id: str = 'cam') -> object:
    return Header(stamp=Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9), frame_id=frame_id)


def image_msg(stamp_ns: int, pixels: np.ndarray, encoding: str, *, pad: int = 0,
              bigendian: bool = False) -> object:
    """An Image whose rows are padded with ``pad`` garbage bytes."""
    H, W = pixels.shape[:2]
    if bigendian:
        pixels = pixels.astype(pixels.dtype.newbyteorder('>'))
    rows = np.ascontiguousarray(pixels).view(np.uint8).reshape(H, -1)
    garbage = np.full((H, pad), 0xAB, dtype=np.uint8)
    data = np.concatenate([rows, garbage], axis=1).reshape(-1)
    return Image(header=header(stamp_ns), height=H, width=W, encoding=encoding,
                 is_bigendian=int(bigendian), step=rows.shape[1] + pad, data=data)


def camera_info_msg(stamp_ns: int, K: np.ndarray, W: int, H: int) -> object:
    return CameraInfo(header=header(stamp_ns), height=H, width=W, distortion_model='plumb_bob',
                      d=np.zeros(5), k=K.astype(np.float64).ravel(), r=np.eye(3).ravel(),
                      p=np.hstack([K, np.zeros((3, 1))]).ravel(), binning_x=0, binning_y=0,
                      roi=TS.types['sensor_msgs/msg/RegionOfInterest'](
                          x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))


def write_bag(path: Path, storage: str, messages: list[tuple[str, int, object]]) -> Path:
    """Write (topic, bag time ns, msg) in the given order."""
    with Writer(path, version=9, storage_plugin=STORAGES[storage]) as writer:
        conns = {}
        for topic, log_ns, msg in messages:
            msgtype = msg.__msgtype__
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=TS)
            writer.write(conns[topic], log_ns, TS.serialize_cdr(msg, msgtype))
    return path


def frames(n: int, H: int = 6, W: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


# -- image_codecs ------------------------------------------------------------------------------

@pytest.mark.parametrize('bigendian', [False, True])
def test_decode_16bit_and_float_respect_byte_order_and_padding(bigendian):
    mm = np.array([[0, 1000, 65535], [1500, 2, 40000]], dtype=np.uint16)
    msg = image_msg(0, mm[..., None], '16UC1', pad=3, bigendian=bigendian)
    depth = image_codecs.image_msg_to_depth_m(msg)
    assert np.isnan(depth[0, 0])
    np.testing.assert_allclose(depth[~np.isnan(depth)], mm[mm > 0] / 1000.0, rtol=1e-6)

    metres = np.array([[0.0, 1.25, np.nan], [np.inf, 3.5, -1.0]], dtype=np.float32)
    depth = image_codecs.image_msg_to_depth_m(
        image_msg(0, metres[..., None], '32FC1', pad=4, bigendian=bigendian))
    np.testing.assert_array_equal(np.isnan(depth), [[True, False, True], [True, False, True]])
    assert depth[0, 1] == 1.25 and depth[1, 1] == 3.5

    rgb16 = (np.arange(2 * 3 * 3, dtype=np.uint16).reshape(2, 3, 3) * 3000)
    out = image_codecs.image_msg_to_rgb(image_msg(0, rgb16, 'rgb16', pad=2, bigendian=bigendian))
    # 16 -> 8 bits keeps the top byte (the node's choice, see image_codecs._to_8bit).
    np.testing.assert_array_equal(out, (rgb16 >> 8).astype(np.uint8))


def test_yuv422_orders_agree_and_have_colour():
    H, W = 2, 4
    Y = np.full((H, W), 120, np.uint8)
    U = np.full((H, W // 2), 200, np.uint8)  # strongly blue
    V = np.full((H, W // 2), 100, np.uint8)
    uyvy = np.stack([U, Y[:, 0::2], V, Y[:, 1::2]], axis=-1).reshape(H, W, 2)
    yuyv = np.stack([Y[:, 0::2], U, Y[:, 1::2], V], axis=-1).reshape(H, W, 2)
    a = image_codecs.decode_rgb('yuv422', H, W, W * 2, 0, uyvy.tobytes())
    b = image_codecs.decode_rgb('uyvy', H, W, W * 2, 0, uyvy.tobytes())
    c = image_codecs.decode_rgb('yuyv', H, W, W * 2, 0, yuyv.tobytes())
    d = image_codecs.decode_rgb('yuv422_yuy2', H, W, W * 2, 0, yuyv.tobytes())
    for other in (b, c, d):
        np.testing.assert_array_equal(a, other)
    assert a.shape == (H, W, 3) and (a[..., 2] > a[..., 0] + 50).all()  # blue over red


def test_decode_errors_name_the_problem():
    with pytest.raises(image_codecs.ImageDecodeError, match='unsupported encoding'):
        image_codecs.decode_rgb('hsv8', 2, 2, 6, 0, bytes(12))
    with pytest.raises(image_codecs.ImageDecodeError, match='unsupported depth encoding'):
        image_codecs.decode_depth_m('rgb8', 2, 2, 6, 0, bytes(12))
    with pytest.raises(image_codecs.ImageDecodeError, match='needs 18 bytes'):
        image_codecs.decode_rgb('rgb8', 2, 3, 9, 0, bytes(10))
    with pytest.raises(image_codecs.ImageDecodeError, match='step 5 is smaller'):
        image_codecs.decode_rgb('rgb8', 2, 3, 5, 0, bytes(30))
    with pytest.raises(image_codecs.ImageDecodeError, match='could not decode'):
        image_codecs.decode_compressed_rgb('jpeg', b'not a jpeg at all')


def test_node_encodings_decode_from_rosbags_messages():
    """The node's extra encodings (bayer, nv12, float intensity) also reach bag training."""
    mosaic = np.zeros((8, 8), np.uint8)
    mosaic[0::2, 0::2], mosaic[1::2, 1::2] = 200, 30  # R, B; G elsewhere
    mosaic[0::2, 1::2] = mosaic[1::2, 0::2] = 100
    out = image_codecs.image_msg_to_rgb(image_msg(0, mosaic[..., None], 'bayer_rggb8', pad=3))
    np.testing.assert_allclose(out[2:-2, 2:-2].reshape(-1, 3).mean(0), [200, 100, 30], atol=2)
    mosaic16 = mosaic.astype(np.uint16) * 257
    for bigendian in (False, True):
        out16 = image_codecs.image_msg_to_rgb(
            image_msg(0, mosaic16[..., None], 'bayer_rggb16', pad=2, bigendian=bigendian))
        np.testing.assert_array_equal(out16, out)
    blue = np.zeros((4, 8, 3), np.uint8)
    blue[..., 2] = 255
    i420 = cv2.cvtColor(blue, cv2.COLOR_RGB2YUV_I420).ravel()
    nv12 = np.concatenate([i420[:32], np.stack([i420[32:40], i420[40:48]], 1).ravel()])
    out = image_codecs.decode_rgb('nv12', 4, 8, 8, 0, nv12)  # a uint8 array as data
    assert (abs(out.astype(int) - [0, 0, 255]) < 30).all()
    grey = np.array([[0.0, 0.5, 1.0]], np.float32)
    out = image_codecs.image_msg_to_rgb(image_msg(0, grey[..., None], '32FC1', bigendian=True))
    np.testing.assert_array_equal(out[..., 0], [[0, 128, 255]])
    with pytest.raises(image_codecs.ImageDecodeError, match='NaN'):
        image_codecs.decode_rgb('32FC1', 1, 1, 4, 0, np.float32(np.nan).tobytes())
    with pytest.raises(image_codecs.ImageDecodeError, match=r"'rgb8', 0x2, step 0\): zero size"):
        image_codecs.decode_rgb('rgb8', 2, 0, 0, 0, b'')


def test_compressed_colour_channel_order_from_format():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = 220, 40
    ok, rgb_inside = cv2.imencode('.png', rgb)  # bytes in RGB order, labelled as such
    ok, bgr_inside = cv2.imencode('.png', rgb[..., ::-1])
    np.testing.assert_array_equal(
        image_codecs.decode_compressed_rgb('rgb8; png compressed rgb8', rgb_inside), rgb)
    for fmt in ('rgb8; png compressed bgr8', 'png', 'PNG'):
        np.testing.assert_array_equal(image_codecs.decode_compressed_rgb(fmt, bgr_inside), rgb)
    ok, mono16 = cv2.imencode('.png', np.full((2, 3), 0x1234, np.uint16))
    out = image_codecs.decode_compressed_rgb('mono16; png compressed mono16', mono16)
    assert out.shape == (2, 3, 3) and (out == 0x12).all()
    with pytest.raises(image_codecs.ImageDecodeError, match='compressedDepth'):
        image_codecs.decode_compressed_rgb('16UC1; compressedDepth png', mono16)
    with pytest.raises(image_codecs.ImageDecodeError, match='empty'):
        image_codecs.decode_compressed_rgb('jpeg', b'')


def test_compressed_depth_transport():
    mm = np.array([[0, 1234], [4000, 65535]], dtype=np.uint16)
    ok, png = cv2.imencode('.png', mm)
    payload = np.zeros(3, '<i4').tobytes() + png.tobytes()  # 12-byte config header
    depth = image_codecs.decode_compressed_depth_m('16UC1; compressedDepth png', payload)
    assert np.isnan(depth[0, 0])
    np.testing.assert_allclose(depth[1], [4.0, 65.535], rtol=1e-6)
    # 32FC1: quantised inverse depth, depth = a / (v - b).
    a, b = 100.0, -10.0
    v = np.array([[0, 90], [40, 190]], dtype=np.uint16)
    ok, png = cv2.imencode('.png', v)
    payload = np.int32(0).tobytes() + np.array([a, b], '<f4').tobytes() + png.tobytes()
    depth = image_codecs.decode_compressed_depth_m('32FC1; compressedDepth png', payload)
    np.testing.assert_allclose(depth, [[np.nan, 1.0], [2.0, 0.5]], rtol=1e-6)


# -- bags: encodings, order, storages ----------------------------------------------------------

ENCODINGS = ['rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', 'mono16']


def encode_pixels(rgb: np.ndarray, encoding: str) -> tuple[np.ndarray, np.ndarray]:
    """(pixels in ``encoding``, the RGB the decoder must return)."""
    if encoding == 'rgb8':
        return rgb, rgb
    if encoding == 'bgr8':
        return rgb[..., ::-1], rgb
    if encoding in ('rgba8', 'bgra8'):
        order = rgb if encoding == 'rgba8' else rgb[..., ::-1]
        alpha = np.full(rgb.shape[:2] + (1,), 77, np.uint8)
        return np.concatenate([order, alpha], axis=-1), rgb
    grey = rgb[..., :1]
    if encoding == 'mono8':
        return grey, np.repeat(grey, 3, axis=-1)
    grey16 = grey.astype(np.uint16) * 257  # exact round trip through the 16 -> 8 bit scaling
    return grey16, np.repeat(grey, 3, axis=-1)


@pytest.mark.parametrize('storage', ['sqlite3', 'mcap'])
def test_bag_pixels_and_header_stamp_order(tmp_path, storage):
    n = len(ENCODINGS) + 2
    rgb = frames(n)
    stamps = (1_700_000_000 + np.arange(n)) * 10**9 + 123
    # Written (and received) in a scrambled order: bag time increases, header stamps do not.
    order = np.random.default_rng(1).permutation(n)
    messages, expected = [], {}
    for k, i in enumerate(order):
        encoding = (ENCODINGS + ['rgb8', 'bgr8'])[i]
        pixels, want = encode_pixels(rgb[i], encoding)
        pad = 5 if i % 2 else 0
        messages.append(('/cam/image_raw', 10**9 + k * 10**6,
                         image_msg(int(stamps[i]), pixels, encoding, pad=pad)))
        expected[i] = want
    path = write_bag(tmp_path / f'bag_{storage}', storage, messages)

    assert bags.image_topics(path) == [('/cam/image_raw', bags.IMAGE_TYPE, n)]
    source = bags.BagSource(path, window_frames=n, progress=False)
    assert len(source) == 1 and source.num_frames == n
    window = source.window(0, n, 1)
    np.testing.assert_array_equal(window['stamps_ns'], stamps)
    assert window['video'].dtype == np.uint8 and window['video'].shape == (n, 6, 8, 3)
    for i in range(n):
        np.testing.assert_array_equal(window['video'][i], expected[i], err_msg=f'frame {i}')
    assert 'depth' not in window and 'intrinsics' not in window
    # frame_step subsampling picks every other frame in stamp order.
    sub = source.window(0, 3, 2)
    np.testing.assert_array_equal(sub['stamps_ns'], stamps[[0, 2, 4]])
    np.testing.assert_array_equal(sub['video'][1], expected[2])
    # read_frames streams in bag-time order (the recording order).
    streamed = list(bags.read_frames(path))
    assert [f.stamp_ns for f in streamed] == [int(stamps[i]) for i in order]
    np.testing.assert_array_equal(streamed[0].rgb, expected[order[0]])
    assert streamed[0].frame_id == 'cam'


@pytest.mark.parametrize('storage', ['sqlite3', 'mcap'])
def test_compressed_images(tmp_path, storage):
    rgb = frames(3, H=16, W=24, seed=3)
    # Smooth, strongly coloured gradients so that JPEG is close and a channel swap is not.
    yy, xx = np.mgrid[0:16, 0:24]
    rgb[2] = np.stack([xx * 10, 255 - yy * 15, np.full_like(xx, 40)], axis=-1).astype(np.uint8)
    messages = []
    formats = ['rgb8; png compressed bgr8', 'png', 'rgb8; jpeg compressed bgr8']
    for i, fmt in enumerate(formats):
        ext = '.jpg' if 'jpeg' in fmt else '.png'
        ok, buf = cv2.imencode(ext, rgb[i][..., ::-1])  # image_transport compresses BGR
        msg = CompressedImage(header=header(10**9 * (i + 1)), format=fmt,
                              data=buf.reshape(-1))
        messages.append(('/cam/image_raw/compressed', 10**9 * (i + 1), msg))
    path = write_bag(tmp_path / 'bag', storage, messages)
    window = bags.BagSource(path, window_frames=3, progress=False).window(0, 3, 1)
    np.testing.assert_array_equal(window['video'][:2], rgb[:2])  # PNG is lossless
    jpeg = window['video'][2].astype(int)
    assert np.abs(jpeg - rgb[2]).mean() < 3.0  # JPEG is not lossless
    assert np.abs(jpeg[..., ::-1] - rgb[2]).mean() > 30.0


def test_two_image_topics_without_topic_lists_them(tmp_path):
    rgb = frames(3)
    messages = [('/left/image_raw', i, image_msg(i, rgb[i], 'rgb8')) for i in range(3)]
    messages += [('/right/image_raw', 10 + i, image_msg(10 + i, rgb[i], 'rgb8')) for i in range(2)]
    path = write_bag(tmp_path / 'bag', 'mcap', messages)
    with pytest.raises(bags.BagError) as info:
        bags.BagSource(path, progress=False)
    text = str(info.value)
    assert str(path) in text and 'several image topics' in text
    assert '/left/image_raw  [sensor_msgs/msg/Image]  3 messages' in text
    assert '/right/image_raw  [sensor_msgs/msg/Image]  2 messages' in text
    with pytest.raises(bags.BagError, match="no image topic '/nope'"):
        bags.BagSource(path, topic='/nope', progress=False)
    source = bags.BagSource(path, topic='/right/image_raw', window_frames=2, progress=False)
    np.testing.assert_array_equal(source.window(0, 2)['video'], rgb[:2])


def test_truncated_mcap_yields_readable_prefix(tmp_path):
    n = 160
    rgb = frames(n, H=64, W=96, seed=5)  # 18 KB per frame: rosbags writes ~1 MB chunks
    messages = [('/cam/image_raw', 10**9 + i * 10**8, image_msg(10**9 + i * 10**8, rgb[i], 'rgb8'))
                for i in range(n)]
    path = write_bag(tmp_path / 'bag', 'mcap', messages)
    mcap = next(path.glob('*.mcap'))
    data = mcap.read_bytes()
    mcap.write_bytes(data[: int(len(data) * 0.75)])  # cut in the middle of the data section

    with pytest.warns(UserWarning, match='truncated'):
        source = bags.BagSource(path, window_frames=8, progress=False)
    count = source.num_frames
    assert 8 <= count < n, count
    assert len(source) == count // 8
    start = (len(source) - 1) * 8
    last = source.window(len(source) - 1, 8, 1)
    np.testing.assert_array_equal(last['stamps_ns'], 10**9 + np.arange(start, start + 8) * 10**8)
    np.testing.assert_array_equal(last['video'], rgb[start: start + 8])
    # The last readable frame is intact too (a window reaching the end is shifted back to fit).
    np.testing.assert_array_equal(source.window(len(source) - 1, 12, 1)['video'][-1],
                                  rgb[count - 1])
    with pytest.warns(UserWarning, match='truncated'):
        streamed = [f.rgb for f in bags.read_frames(mcap)]  # the bare file works too
    assert len(streamed) == count
    np.testing.assert_array_equal(streamed[0], rgb[0])


def test_unreadable_bag_names_the_file(tmp_path):
    junk = tmp_path / 'junk.mcap'
    junk.write_bytes(b'this is not a bag')
    with pytest.raises(bags.BagError, match='junk.mcap'):
        bags.image_topics(junk)
    with pytest.raises(bags.BagError, match='does not exist'):
        bags.BagSource(tmp_path / 'missing', progress=False)
    # A cut-short sqlite3 bag cannot be salvaged: a clear error naming the bag.
    rgb = frames(3)
    path = write_bag(tmp_path / 'sq', 'sqlite3',
                     [('/cam/image_raw', i, image_msg(i, rgb[i], 'rgb8')) for i in range(3)])
    db = next(path.glob('*.db3'))
    db.write_bytes(db.read_bytes()[:5000])
    with pytest.raises(bags.BagError, match=f'cannot read bag {path}'):
        bags.BagSource(path, progress=False)


# -- RGB-D, camera info, several bags ----------------------------------------------------------

def test_rgbd_pairing_by_stamp(tmp_path):
    n = 6
    rgb = frames(n, H=8, W=10)
    t0 = 5 * 10**9
    period = 100_000_000  # 10 Hz
    K = np.array([[20.0, 0, 4.5], [0, 20.0, 3.5], [0, 0, 1]])  # for 10x8 images
    messages = [('/cam/camera_info', t0, camera_info_msg(t0, K, 10, 8))]
    depth_mm = np.full((n, 4, 5), 1000, np.uint16) + np.arange(n, dtype=np.uint16)[:, None, None]
    depth_mm[:, 0, 0] = 0  # no return -> NaN
    # Depth at half resolution; offsets from the colour stamps (ms): frame 3 has none, frame 4's is
    # 30 ms away (beyond the 20 ms tolerance), the others within it on either side.
    offsets_ms = {0: 5, 1: -8, 2: 19, 4: 30, 5: 0}
    for i in range(n):
        stamp = t0 + i * period
        messages.append(('/cam/image_raw', stamp + 3_000_000, image_msg(stamp, rgb[i], 'rgb8')))
        if i in offsets_ms:
            d_stamp = stamp + offsets_ms[i] * 1_000_000
            messages.append(('/cam/depth', d_stamp + 1_000_000,
                             image_msg(d_stamp, depth_mm[i][..., None], '16UC1')))
    messages.sort(key=lambda m: m[1])
    path = write_bag(tmp_path / 'bag', 'sqlite3', messages)

    with pytest.warns(UserWarning, match='2 of 6 colour frames have no depth'):
        source = bags.BagSource(path, topic='/cam/image_raw', depth_topic='/cam/depth',
                                window_frames=n, progress=False)
    assert source.unmatched_depth == 2
    window = source.window(0, n, 1)
    depth = window['depth']
    assert depth.shape == (n, 8, 10) and depth.dtype == np.float32
    for i in range(n):
        if i in (3, 4):
            assert np.isnan(depth[i]).all(), i
            continue
        expected = cv2.resize(depth_mm[i], (10, 8), interpolation=cv2.INTER_NEAREST) / 1000.0
        expected[expected == 0] = np.nan
        np.testing.assert_allclose(depth[i], expected, rtol=1e-6, err_msg=f'frame {i}')
    assert np.isnan(depth[0, :2, :2]).all()  # the 0 mm pixel, upsampled 2x
    np.testing.assert_allclose(window['intrinsics'], K)  # sibling camera_info found by name
    assert window['intrinsics'].dtype == np.float32


def test_32fc1_depth_and_rescaled_camera_info(tmp_path):
    rgb = frames(2, H=8, W=10)
    K_half = np.array([[10.0, 0, 2.0], [0, 10.0, 1.5], [0, 0, 1]])  # calibrated at 5x4
    metres = np.full((2, 8, 10, 1), 2.5, np.float32)
    metres[1, 3, 3] = np.nan
    messages = [('/info', 0, camera_info_msg(0, K_half, 5, 4))]
    for i in range(2):
        messages.append(('/rgb', 10 + i, image_msg(i * 10**8, rgb[i], 'rgb8')))
        messages.append(('/depth', 20 + i, image_msg(i * 10**8, metres[i], '32FC1')))
    path = write_bag(tmp_path / 'bag', 'mcap', messages)
    with pytest.warns(UserWarning, match='scaling the intrinsics by 2'):
        source = bags.BagSource(path, topic='/rgb', depth_topic='/depth',
                                camera_info_topic='/info', window_frames=2, progress=False)
    window = source.window(0, 2, 1)
    assert np.isnan(window['depth'][1, 3, 3]) and np.nansum(window['depth'] != 2.5) == 1
    # Pixel centres at integer coordinates: cx' = (cx + 0.5) * 2 - 0.5.
    np.testing.assert_allclose(window['intrinsics'], [[20, 0, 4.5], [0, 20, 3.5], [0, 0, 1]])


def test_several_bags_windows_and_pickling(tmp_path):
    rgb = frames(12, seed=7)
    paths = []
    for b, count in enumerate((7, 5)):
        offset = 0 if b == 0 else 7
        messages = [('/cam/image_raw', i, image_msg(i * 10**8, rgb[offset + i], 'rgb8'))
                    for i in range(count)]
        paths.append(write_bag(tmp_path / f'bag{b}', 'sqlite3' if b else 'mcap', messages))
    source = bags.BagSource(paths, window_frames=3, progress=False)
    assert len(source) == 2 + 1 and source.name.startswith('bag:')
    np.testing.assert_array_equal(source.window(1, 3)['video'], rgb[3:6])
    np.testing.assert_array_equal(source.window(2, 3)['video'], rgb[7:10])  # second bag
    # A longer window is shifted back to end at its bag's last frame, never crossing bags.
    np.testing.assert_array_equal(source.window(1, 4, 1)['video'], rgb[3:7])
    np.testing.assert_array_equal(source.window(2, 3, 2)['video'], rgb[[7, 9, 11]])
    with pytest.raises(ValueError, match='too few for a window'):
        source.window(2, 4, 2)
    with pytest.raises(IndexError):
        source.window(3, 3)
    # Deterministic and usable after a round trip through pickle (DataLoader workers).
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone.window(0, 3)['video'], source.window(0, 3)['video'])
    source.close()
    clone.close()
