"""ament_python packaging for moog_ros.

The top-level ``training/`` folder is installed as the ``moog_ros.training`` subpackage, so
``torchrun -m moog_ros.training.pretrain`` works from any installed copy.
"""
from glob import glob
import os

from setuptools import setup

PACKAGE = 'moog_ros'


def tree(src: str, dst_root: str) -> list:
    """data_files entries for every file under ``src`` (keeps sub-folders)."""
    entries = {}
    for path in sorted(glob(os.path.join(src, '**', '*'), recursive=True)):
        if os.path.isfile(path):
            rel_dir = os.path.relpath(os.path.dirname(path), src)
            dst = os.path.normpath(os.path.join(dst_root, rel_dir))
            entries.setdefault(dst, []).append(path)
    return sorted(entries.items())


setup(
    name=PACKAGE,
    version='0.1.0',
    packages=[
        PACKAGE,
        f'{PACKAGE}.model',
        f'{PACKAGE}.ros',
        f'{PACKAGE}.tools',
        f'{PACKAGE}.training',
    ],
    package_dir={f'{PACKAGE}.training': 'training'},
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml']),
        (f'share/{PACKAGE}/launch', glob('launch/*.launch.py')),
        (f'share/{PACKAGE}/config', glob('config/*.yaml')),
        (f'share/{PACKAGE}/rviz', glob('rviz/*.rviz')),
        (f'share/{PACKAGE}/samples', glob('samples/*.mcap')),
        *tree('models', f'share/{PACKAGE}/models'),
        *tree('interfaces', f'share/{PACKAGE}/interfaces'),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='moog_ros maintainers',
    maintainer_email='maintainers@moog-ros.invalid',
    description='MooG off-the-grid video tokens on a ROS 2 camera: depth, point tracks, boxes.',
    license='Apache-2.0',
    tests_require=['pytest'],
    entry_points={
        'console_scripts': [
            'moog_node = moog_ros.ros.node:main',
            'moog_infer = moog_ros.tools.infer:main',
            'moog_demo = moog_ros.tools.demo:main',
            'moog_generate = moog_ros.training.generate:main',
            'moog_pretrain = moog_ros.training.pretrain:main',
            'moog_fit_readouts = moog_ros.training.fit_readouts:main',
            'moog_evaluate = moog_ros.training.evaluate:main',
            'moog_convert = moog_ros.training.convert:main',
            'moog_export = moog_ros.training.export:main',
        ],
    },
)
