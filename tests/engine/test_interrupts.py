"""When a step may be abandoned: once requested, never twice in a row, never with preemption off."""

from __future__ import annotations

from server.engine.interrupts import StepInterrupts


def test_a_request_before_the_pass_does_not_interrupt_the_step_it_plans() -> None:
    interrupts = StepInterrupts(enabled=True)
    interrupts.request()  # queued before the pass: the pass itself admits it
    event = interrupts.arm()
    assert event is not None and not event.is_set()
    interrupts.request()  # arrives during the step
    assert event.is_set()


def test_never_two_interrupted_steps_in_a_row() -> None:
    interrupts = StepInterrupts(enabled=True)
    interrupts.arm()
    interrupts.interrupted()
    assert interrupts.arm() is None, "the step after an interrupted one runs to the end"
    interrupts.completed()
    assert interrupts.arm() is not None
    assert interrupts.count == 1


def test_without_preemption_nothing_is_interrupted() -> None:
    interrupts = StepInterrupts(enabled=False)
    interrupts.request()
    assert interrupts.arm() is None
