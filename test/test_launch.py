"""Static checks of launch/moog.launch.py and rviz/moog.rviz.

launch_ros is not installable without a ROS distribution, so the launch file is read as source:
its arguments, the parameters it passes (each must be one the node declares), the files it
names (each must be installed by setup.py), the executable it starts and the choices it offers.
"""
import ast
import contextlib
import importlib.util
from pathlib import Path

import yaml

from moog_ros.ros.node import OUTPUTS
from moog_ros.ros.params import DEFAULTS, PARAMETER_NAMES

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO / 'launch' / 'moog.launch.py'
TREE = ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))
REQUIRED_ARGUMENTS = {'params_file', 'image_topic', 'camera_info_topic', 'namespace',
                      'use_sim_time', 'log_level', 'device', 'checkpoint', 'rviz'}
# Parameters every rclpy node declares by itself.
BUILTIN_PARAMETERS = {'use_sim_time'}


def _setup_kwargs() -> dict:
    spec = importlib.util.spec_from_file_location(
        'link_share_files', REPO / 'scripts' / 'link_share_files.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.read_setup_kwargs(REPO)


def _constants() -> dict:
    """Module-level NAME = <literal> assignments of the launch file."""
    out = {}
    for node in TREE.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(
                node.targets[0], ast.Name):
            with contextlib.suppress(ValueError):  # not a literal: not a constant
                out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def _calls(name: str) -> list[ast.Call]:
    return [node for node in ast.walk(TREE) if isinstance(node, ast.Call) and (
        getattr(node.func, 'id', None) == name or getattr(node.func, 'attr', None) == name)]


def _keyword(call: ast.Call, name: str):
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def _declared_arguments() -> dict[str, dict]:
    constants = _constants()
    arguments = {}
    for call in _calls('DeclareLaunchArgument'):
        name = ast.literal_eval(call.args[0])
        default = _keyword(call, 'default_value')
        choices = _keyword(call, 'choices')
        if isinstance(choices, ast.Name):
            choices = constants[choices.id]
        elif choices is not None:
            choices = ast.literal_eval(choices)
        arguments[name] = {
            'default': ast.literal_eval(default) if isinstance(default, ast.Constant) else default,
            'choices': choices,
            'description': ast.literal_eval(_keyword(call, 'description')),
        }
    return arguments


def test_launch_arguments_are_declared_with_valid_choices():
    arguments = _declared_arguments()
    assert arguments.keys() >= REQUIRED_ARGUMENTS
    for name, argument in arguments.items():
        assert argument['description'], name
        if argument['choices'] is not None and isinstance(argument['default'], str):
            assert argument['default'] in argument['choices'], name
    assert arguments['rviz']['choices'] == ['true', 'false']
    assert arguments['use_sim_time']['choices'] == ['true', 'false']
    assert set(arguments['log_level']['choices']) == {'debug', 'info', 'warn', 'error', 'fatal'}


def test_every_used_launch_configuration_is_declared():
    declared = _declared_arguments().keys()
    used = {ast.literal_eval(call.args[0]) for call in _calls('arg') + _calls(
        'LaunchConfiguration') if isinstance(call.args[0], ast.Constant)}
    used |= set(_constants()['PARAMETER_ARGUMENTS'])
    assert used and used <= declared, used - declared


def _parameter_dicts() -> list[ast.Dict]:
    """Dict literals the node's ``parameters=`` list holds, directly or through a variable."""
    (lifecycle,) = _calls('LifecycleNode')
    dicts = []
    for item in _keyword(lifecycle, 'parameters').elts:
        if isinstance(item, ast.Dict):
            dicts.append(item)
        elif isinstance(item, ast.Name):
            dicts += [node.value for node in ast.walk(TREE) if isinstance(node, ast.Assign)
                      and any(getattr(t, 'id', None) == item.id for t in node.targets)
                      and isinstance(node.value, ast.Dict)]
    return dicts


def test_every_parameter_passed_is_declared_by_the_node():
    dicts = _parameter_dicts()
    assert dicts
    # The dict's own keys plus the launch arguments copied into it by name.
    passed = set(_constants()['PARAMETER_ARGUMENTS'])
    for node in dicts:
        passed |= {ast.literal_eval(key) for key in node.keys}
    passed -= BUILTIN_PARAMETERS
    assert {'autostart', 'device', 'checkpoint'} <= passed
    assert passed <= set(PARAMETER_NAMES), passed - set(PARAMETER_NAMES)
    # The launch file drives the lifecycle; the node must not also start itself.
    (overrides,) = [node for node in dicts if any(k.value == 'autostart' for k in node.keys)]
    value = overrides.values[[k.value for k in overrides.keys].index('autostart')]
    assert ast.literal_eval(value) is False
    assert DEFAULTS['autostart'] is True  # run directly, the node does start itself


def test_the_lifecycle_node_is_the_installed_executable_with_autostart():
    (lifecycle,) = _calls('LifecycleNode')
    constants = _constants()
    package = _keyword(lifecycle, 'package')
    assert constants[package.id] == 'moog_ros'
    assert ast.literal_eval(_keyword(lifecycle, 'executable')) == 'moog_node'
    assert ast.literal_eval(_keyword(lifecycle, 'autostart')) is True
    scripts = dict(line.replace(' ', '').split('=', 1)
                   for line in _setup_kwargs()['entry_points']['console_scripts'])
    assert scripts['moog_node'] == 'moog_ros.ros.node:main'
    remapped = {ast.literal_eval(pair.elts[0]) for pair in _keyword(lifecycle, 'remappings').elts}
    assert {'image', 'image/compressed', 'camera_info', 'detections_in'} <= remapped


def test_every_file_named_is_installed():
    installed = {}
    for destination, sources in _setup_kwargs()['data_files']:
        for source in sources:
            installed[f'{destination}/{Path(source).name}'] = REPO / source
    named = []
    for call in _calls('join'):
        parts = call.args[1:]
        if isinstance(call.args[0], ast.Name) and call.args[0].id == 'share' and all(
                isinstance(p, ast.Constant) for p in parts):
            named.append('/'.join(ast.literal_eval(p) for p in parts))
    assert sorted(named) == ['config/moog.yaml', 'rviz/moog.rviz']
    for relative in named:
        target = f'share/moog_ros/{relative}'
        assert target in installed, f'{relative} is not installed by setup.py'
        assert installed[target].is_file()


def test_rviz_config_shows_every_visual_output_reliably():
    config = yaml.safe_load((REPO / 'rviz' / 'moog.rviz').read_text())
    displays = config['Visualization Manager']['Displays']
    topics = {d['Topic']['Value']: d for d in displays}
    node_topics = {topic for _, _, topic in OUTPUTS}
    assert set(topics) <= node_topics
    assert topics['overlay']['Class'] == 'rviz_default_plugins/Image'
    assert topics['depth/image']['Class'] == 'rviz_default_plugins/Image'
    assert topics['tracks']['Class'] == 'rviz_default_plugins/PointCloud2'
    for topic in ('tracks/markers', 'detections/markers'):
        assert topics[topic]['Class'] == 'rviz_default_plugins/MarkerArray'
    for display in displays:
        # Explicit, and matching the node's reliable publishers.
        assert display['Topic']['Reliability Policy'] == 'Reliable', display['Name']
