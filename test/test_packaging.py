"""Packaging: what setup.py installs, what package.xml declares, and what the venv resolves.

These are the checks a robot install (rosdep + colcon) and the pip venv both depend on: data
files land in share/moog_ros, every console script imports, every import is declared.
"""

import ast
import filecmp
import importlib
import importlib.metadata
import importlib.util
from pathlib import Path
import re
import sys
import xml.etree.ElementTree as ET

from ament_index_python.packages import get_package_share_directory
from catkin_pkg.package import parse_package
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = 'moog_ros'
SHARE = f'share/{PACKAGE}'


def _load_link_share_files():
    """scripts/link_share_files.py as a module (it owns reading setup.py's keyword args)."""
    spec = importlib.util.spec_from_file_location(
        'link_share_files', REPO / 'scripts' / 'link_share_files.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETUP = _load_link_share_files().read_setup_kwargs(REPO)
CONSOLE_SCRIPTS = dict(
    line.replace(' ', '').split('=', 1) for line in SETUP['entry_points']['console_scripts'])


def installed_data_files() -> dict[str, set[str]]:
    """Destination folder -> repo-relative source paths, from setup.py's data_files."""
    return {dst: {str(Path(src)) for src in srcs} for dst, srcs in SETUP['data_files']}


def _shipped_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob('**/*') if p.is_file() and not p.name.startswith('.')
                  and '__pycache__' not in p.parts)


def _share_folders() -> set[str]:
    """Top-level folders of share/moog_ros that setup.py installs into."""
    return {Path(dst).relative_to(SHARE).parts[0] for dst in installed_data_files()
            if dst.startswith(SHARE + '/')}


@pytest.mark.parametrize('folder', ['launch', 'config', 'rviz', 'models', 'interfaces'])
def test_data_files_ship_each_resource_folder(folder):
    assert folder in _share_folders(), f'setup.py installs nothing into {SHARE}/{folder}'
    installed = {src for srcs in installed_data_files().values() for src in srcs}
    assert any(src.startswith(folder + '/') for src in installed), \
        f'{folder}/ has no file that setup.py installs'


def test_data_files_install_every_file_of_those_folders():
    # A file that misses setup.py's glob (config/foo.yml, launch/x.py) would silently not ship.
    installed = installed_data_files()
    missing = []
    for folder in sorted(_share_folders()):
        for path in _shipped_files(REPO / folder):
            rel = path.relative_to(REPO)
            if str(rel) not in installed.get(str(Path(SHARE) / rel.parent), set()):
                missing.append(str(rel))
    assert not missing, f'files setup.py does not install: {missing}'


def test_ament_index_marker_and_manifest_are_installed():
    installed = installed_data_files()
    assert f'resource/{PACKAGE}' in installed['share/ament_index/resource_index/packages']
    assert (REPO / 'resource' / PACKAGE).is_file()
    assert 'package.xml' in installed[SHARE]


def test_setup_cfg_puts_scripts_where_ros2_run_looks():
    text = (REPO / 'setup.cfg').read_text()
    assert re.search(r'^\[develop\]\s*\nscript_dir\s*=\s*\$base/lib/moog_ros\s*$', text, re.M)
    assert re.search(r'^\[install\]\s*\ninstall_scripts\s*=\s*\$base/lib/moog_ros\s*$', text, re.M)


def test_package_xml_is_valid_format_3_and_matches_setup_py():
    package = parse_package(str(REPO / 'package.xml'))  # validates; raises InvalidPackage
    assert package.package_format == 3
    assert package.name == PACKAGE == SETUP['name']
    assert package.version == SETUP['version']
    assert package.get_build_type() == 'ament_python'
    assert SETUP['license'] in package.licenses
    assert package.maintainers and package.description.strip()
    exec_depends = {dep.name for dep in package.exec_depends}
    node_needs = {
        'rclpy', 'builtin_interfaces', 'std_msgs', 'sensor_msgs', 'geometry_msgs',
        'visualization_msgs', 'vision_msgs', 'diagnostic_msgs', 'launch', 'launch_ros',
        'ament_index_python', 'python3-numpy', 'python3-yaml'}
    assert node_needs <= exec_depends, f'missing exec_depends: {node_needs - exec_depends}'
    root = ET.parse(REPO / 'package.xml').getroot()
    assert root.find('buildtool_depend').text == 'ament_python'


# --- every import in the project is declared -----------------------------------------------

# Third-party imports of the runtime package and the rosdep keys that provide them on a robot.
ROSDEP_KEYS = {'numpy': 'python3-numpy', 'yaml': 'python3-yaml', 'cv2': 'python3-opencv',
               'tqdm': 'python3-tqdm', 'scipy': 'python3-scipy', 'PIL': 'python3-pil'}
# No rosdep key exists for these; package.xml says to pip-install them (README, robot install).
PIP_ONLY = {'torch', 'safetensors', 'rosbags', 'pybullet', 'pybullet_data'}
ROS_NAMES = re.compile(r'rclpy|launch|launch_ros|ament_index_python|\w+_(msgs|srvs|interfaces)')


def _guarded_by_import_error(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """True for imports inside a ``try:`` body whose handlers catch ImportError."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.Try) and child in parent.body:
            for handler in parent.handlers:
                names = ast.unparse(handler.type) if handler.type else 'ImportError'
                if 'ImportError' in names or 'ModuleNotFoundError' in names:
                    return True
        child, parent = parent, parents.get(parent)
    return False


def project_imports(folders: tuple[str, ...]) -> dict[str, set[str]]:
    """Top-level module name -> files that import it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in sorted((REPO / folder).rglob('*.py')):
            tree = ast.parse(path.read_text(), filename=str(path))
            parents = {child: node for node in ast.walk(tree)
                       for child in ast.iter_child_nodes(node)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                if _guarded_by_import_error(node, parents):
                    continue
                for name in names:
                    found.setdefault(name.split('.')[0], set()).add(
                        str(path.relative_to(REPO)))
    return found


def _third_party(imports: dict[str, set[str]]) -> dict[str, set[str]]:
    # Scripts and tests import sibling modules by file name (conftest, fixtures_*, ...).
    local = {p.stem for folder in ('bench', 'scripts', 'test', 'launch')
             for p in (REPO / folder).glob('*.py')}
    first_party = {PACKAGE, 'training'} | local
    return {name: files for name, files in imports.items()
            if name not in sys.stdlib_module_names and name not in first_party}


def test_ros_imports_are_exec_depends():
    exec_depends = {dep.name for dep in parse_package(str(REPO / 'package.xml')).exec_depends}
    imports = _third_party(project_imports(('moog_ros', 'training', 'launch')))
    missing = {name: sorted(files) for name, files in imports.items()
               if ROS_NAMES.fullmatch(name) and name not in exec_depends}
    assert not missing, f'ROS packages imported but not <exec_depend> in package.xml: {missing}'


def test_runtime_third_party_imports_have_a_rosdep_key_or_are_pip_only():
    exec_depends = {dep.name for dep in parse_package(str(REPO / 'package.xml')).exec_depends}
    imports = _third_party(project_imports(('moog_ros', 'launch')))
    problems = {}
    for name, files in sorted(imports.items()):
        if ROS_NAMES.fullmatch(name) or name in PIP_ONLY:
            continue
        key = ROSDEP_KEYS.get(name)
        if key is None or key not in exec_depends:
            problems[name] = (key or 'no known rosdep key', sorted(files))
    assert not problems, f'runtime imports a robot install would miss: {problems}'


def _requirement_names() -> set[str]:
    names = set()
    for line in (REPO / 'requirements.txt').read_text().splitlines():
        line = line.split('#', 1)[0].strip()
        if line:
            names.add(re.split(r'[\[=<>!~; ]', line, maxsplit=1)[0])
    return {re.sub(r'[-_.]+', '-', n).lower() for n in names}


def test_every_third_party_import_is_pinned_in_requirements():
    requirements = _requirement_names()
    distributions = importlib.metadata.packages_distributions()
    imports = _third_party(project_imports(
        ('moog_ros', 'training', 'launch', 'bench', 'scripts', 'test')))
    problems = {}
    for name, files in sorted(imports.items()):
        if ROS_NAMES.fullmatch(name):
            continue  # from the ros-kilted-* wheels (or built here); checked via package.xml
        dists = {re.sub(r'[-_.]+', '-', d).lower() for d in distributions.get(name, [])}
        if not dists:
            problems[name] = ('not installed', sorted(files))
        elif not dists & requirements:
            problems[name] = (f'distribution {sorted(dists)} not in requirements.txt',
                              sorted(files))
    assert not problems, f'imports not pinned in requirements.txt: {problems}'


# --- the installed venv ----------------------------------------------------------------------

@pytest.mark.parametrize('script', sorted(CONSOLE_SCRIPTS))
def test_console_script_target_imports(script):
    module_name, func_name = CONSOLE_SCRIPTS[script].split(':')
    module = importlib.import_module(module_name)
    assert callable(getattr(module, func_name, None)), \
        f'{script}: {module_name} has no callable {func_name}'
    assert (Path(sys.prefix) / 'bin' / script).is_file(), \
        f'{script} is not installed in {sys.prefix}/bin (run bash scripts/setup_env.sh)'


def test_share_directory_resolves_through_the_ament_index(monkeypatch):
    monkeypatch.setenv('AMENT_PREFIX_PATH', sys.prefix)
    share = Path(get_package_share_directory(PACKAGE))
    assert share == Path(sys.prefix) / SHARE
    for dst, sources in installed_data_files().items():
        for src in sources:
            installed = Path(sys.prefix) / dst / Path(src).name
            assert installed.is_file(), f'{installed} missing (run bash scripts/setup_env.sh)'
            assert filecmp.cmp(installed, REPO / src, shallow=False), \
                f'{installed} differs from {src}'
    assert Path(get_package_share_directory('vision_msgs')) == \
        Path(sys.prefix) / 'share' / 'vision_msgs'
