"""Launch moog_node as a lifecycle node brought to active automatically, and optionally RViz.

    ros2 launch moog_ros moog.launch.py image_topic:=/camera/color/image_raw \\
        camera_info_topic:=/camera/color/camera_info rviz:=true

The node's topics are relative (``image``, ``camera_info``, ``depth/image``, ``tracks``, ...):
``namespace`` places them, and the image / camera_info / detector inputs are remapped here.
``input_transport: compressed`` in the params file makes the node read
``<image_topic>/compressed``.
The node's own ``autostart`` parameter is set false: ``launch_ros`` drives the transitions
(configure, then activate), so the two never race.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node

from launch import LaunchDescription

PACKAGE = 'moog_ros'
NODE_NAME = 'moog'
BOOLEANS = ['true', 'false']
# Launch arguments that override the node parameter of the same name when given (non-empty);
# left empty, the value from params_file stands.
PARAMETER_ARGUMENTS = ('device', 'checkpoint')


def _arguments(share: str) -> list[DeclareLaunchArgument]:
    return [
        DeclareLaunchArgument(
            'params_file', default_value=os.path.join(share, 'config', 'moog.yaml'),
            description='YAML with the node parameters (ros__parameters under /** or /moog).'),
        DeclareLaunchArgument('image_topic', default_value='/camera/image_raw',
                              description='Camera image topic (sensor_msgs/Image).'),
        DeclareLaunchArgument('camera_info_topic', default_value='/camera/camera_info',
                              description='CameraInfo of that image.'),
        DeclareLaunchArgument(
            'detections_topic', default_value='detections_in',
            description='vision_msgs/Detection2DArray from a detector, seeding box tracks.'),
        DeclareLaunchArgument('namespace', default_value='',
                              description='Namespace of the node (and of RViz).'),
        DeclareLaunchArgument('use_sim_time', default_value='false', choices=BOOLEANS,
                              description='Use /clock (e.g. when playing a bag with --clock).'),
        DeclareLaunchArgument('log_level', default_value='info',
                              choices=['debug', 'info', 'warn', 'error', 'fatal'],
                              description='Log level of the node.'),
        DeclareLaunchArgument(
            'device', default_value='',
            description="Torch device ('auto', 'cpu', 'cuda', 'cuda:N'); empty: params_file."),
        DeclareLaunchArgument(
            'checkpoint', default_value='',
            description='Checkpoint directory; empty: params_file (default: the shipped model).'),
        DeclareLaunchArgument('rviz', default_value='false', choices=BOOLEANS,
                              description='Also start RViz with rviz/moog.rviz.'),
        DeclareLaunchArgument(
            'rviz_fixed_frame', default_value='camera_optical_frame',
            description="RViz fixed frame: the camera's optical frame (the images' frame_id) "
                        'unless TF connects it to another.'),
    ]


def _actions(context, share: str) -> list:
    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    overrides = {'use_sim_time': arg('use_sim_time') == 'true', 'autostart': False}
    for name in PARAMETER_ARGUMENTS:
        if arg(name):
            overrides[name] = arg(name)
    image_topic = arg('image_topic')
    moog = LifecycleNode(
        package=PACKAGE, executable='moog_node', name=NODE_NAME, namespace=arg('namespace'),
        parameters=[arg('params_file'), overrides],
        remappings=[('image', image_topic), ('image/compressed', image_topic + '/compressed'),
                    ('camera_info', arg('camera_info_topic')),
                    ('detections_in', arg('detections_topic'))],
        arguments=['--ros-args', '--log-level', arg('log_level')],
        autostart=True, output='screen', emulate_tty=True)
    # Same namespace as the node: the displays in moog.rviz use relative topic names.
    rviz = Node(
        package='rviz2', executable='rviz2', name='rviz2', namespace=arg('namespace'),
        arguments=['-d', os.path.join(share, 'rviz', 'moog.rviz'),
                   '-f', arg('rviz_fixed_frame')],
        parameters=[{'use_sim_time': overrides['use_sim_time']}],
        condition=IfCondition(arg('rviz')), output='screen')
    return [moog, rviz]


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory(PACKAGE)
    return LaunchDescription([
        *_arguments(share),
        OpaqueFunction(function=_actions, kwargs={'share': share}),
    ])
