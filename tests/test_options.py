"""The one declaration of the run parameters (detector/options.py): the command lines of casc predict and casc
eval are made from it, the library checks a schedule against its bounds, and sleep is parsed one way."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from detector import Schedule, Selection
from detector.options import AUTO, MAX_SLEEP, add_arguments, bounds_of, options_of, parse_value, values_of


def _parser(*declarations, **kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, *declarations, **kwargs)
    return parser


def test_every_option_has_help_and_a_default_from_its_field():
    parser = _parser(Schedule, Selection)
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    assert set(actions) == set(options_of(Schedule, Selection)) == {"wake", "sleep", "burst", "max_sleep", "conf",
                                                                     "iou", "max_det", "classes"}
    fields = {f.name: f for d in (Schedule, Selection) for f in dataclasses.fields(d)}
    for name, action in actions.items():
        assert action.help and action.default == fields[name].default, name
    assert MAX_SLEEP == Schedule().max_sleep == actions["max_sleep"].default


def test_defaults_can_be_replaced_and_options_skipped():
    parser = _parser(Schedule, Selection, defaults={"conf": 0.001}, skip=("classes",))
    args = parser.parse_args(["--sleep", "3", "--max-sleep", "12"])
    assert values_of(args, Schedule) == {"wake": None, "sleep": 3, "burst": None, "max_sleep": 12}
    assert (args.conf, args.iou, args.max_det) == (0.001, 0.7, 300)
    with pytest.raises(AttributeError):
        args.classes  # noqa: B018 - skipped, so never parsed


@pytest.mark.parametrize("argv, message", [
    (["--max-sleep", "0"], "max_sleep must be an integer >= 1, got 0"),
    (["--sleep", "later"], 'sleep must be an integer >= 0 or "auto", got \'later\''),
    (["--sleep", "-1"], 'sleep must be an integer >= 0 or "auto", got -1'),
    (["--wake", "1.5"], "wake must be an integer >= 1, got '1.5'"),
    (["--conf", "2"], "conf must be a number in 0..1, got 2.0"),
    (["--iou", "nan"], "iou must be a number in 0..1, got nan"),
])
def test_a_value_out_of_its_bounds_is_a_usage_error_naming_it(argv, message):
    with pytest.raises(argparse.ArgumentError, match=message.replace("(", r"\(").replace(".", r"\.")):
        _parser(Schedule, Selection).parse_args(argv)


def test_sleep_is_parsed_one_way():
    assert parse_value(Schedule, "sleep", "auto") == AUTO and parse_value(Schedule, "sleep", "0") == 0
    with pytest.raises(ValueError, match="sleep must be"):
        parse_value(Schedule, "sleep", "3.5")


def test_the_library_checks_a_schedule_against_the_declared_bounds():
    from detector.schedule import check_schedule

    assert check_schedule(None, AUTO, None, MAX_SLEEP, levels=4) == (4, 4)
    for wake, sleep, burst, max_sleep, name in ((0, AUTO, None, 8, "wake"), (4, -1, None, 8, "sleep"),
                                                (4, AUTO, 0, 8, "burst"), (4, AUTO, None, 0, "max_sleep")):
        with pytest.raises(ValueError, match=f"^{name} must be an integer >= {bounds_of(Schedule, name).minimum:g}"):
            check_schedule(wake, sleep, burst, max_sleep, levels=4)


def test_casc_predict_and_casc_eval_take_their_run_options_from_the_declaration():
    from detector.predict import add_arguments as predict_arguments
    from eval.cli import add_arguments as eval_arguments

    from eval import EvalConfig

    for add, conf in ((predict_arguments, Selection().conf), (eval_arguments, EvalConfig.conf)):
        parser = argparse.ArgumentParser()
        add(parser)
        defaults = {a.dest: a.default for a in parser._actions}
        assert defaults["max_sleep"] == Schedule().max_sleep and defaults["sleep"] == Schedule().sleep
        assert defaults["conf"] == conf and defaults["max_det"] == Selection().max_det
        help_of = {a.dest: a.help for a in parser._actions}
        assert help_of["burst"] == bounds_of(Schedule, "burst").help


def test_the_library_signatures_default_to_the_declaration():
    import inspect

    from detector import SpikingNetwork
    from detector.detect import SpikingDetector

    for function in (SpikingDetector.predict, SpikingDetector.stream, SpikingDetector.video,
                     SpikingDetector.detections_at_steps, SpikingNetwork.run, SpikingNetwork.stream):
        parameters = inspect.signature(function).parameters
        assert parameters["max_sleep"].default == Schedule().max_sleep, function.__qualname__
        if "iou" in parameters:
            assert (parameters["iou"].default, parameters["max_det"].default) == (Selection().iou,
                                                                                  Selection().max_det)
    assert inspect.signature(SpikingDetector.predict).parameters["conf"].default == Selection().conf
