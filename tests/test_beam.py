"""Batched beam search against a plain per-image reference, on a numpy fake decoder.

Sizes differ on purpose (batch 2 or 5, beams 1..5, vocabulary 7, grid 5) so that a
mixed-up dimension or a wrong flat-index split shows up as a wrong caption.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from caption_cli.beam import NBest, SearchOptions, SearchOptionsError, beam_search
from caption_cli.errors import CaptionCliError

PAD, START, END, UNK = 0, 1, 2, 3
V, H, L, E, A = 7, 4, 5, 3, 2
BANNED = (PAD, START)


class FakeDecoder:
    """A deterministic GRU-ish step in numpy with the decoder.onnx signature.

    Rows are independent (einsum, no BLAS blocking), so a row gives the same numbers
    whatever the batch. `end_weight` ties the <end> logit to feature channel 0, which
    lets a test make one image stop early and another never stop.
    """

    def __init__(self, seed: int, end_weight: float = 0.0) -> None:
        rng = np.random.default_rng(seed)
        self.embed = rng.normal(size=(V, H))
        self.w_hidden = rng.normal(size=(H, H)) * 0.8
        self.w_context = rng.normal(size=(E, H))
        self.w_query = rng.normal(size=(H, A))
        self.w_out = rng.normal(size=(H, V)) * 1.5
        self.end_weight = end_weight
        self.rows: list[int] = []  # batch size of every call

    def __call__(self, token, hidden, features, keys):
        b = token.shape[0]
        assert token.dtype == np.int64 and token.shape == (b,)
        assert hidden.shape == (b, H) and features.shape == (b, L, E) and keys.shape == (b, L, A)
        self.rows.append(b)
        query = np.einsum("bh,ha->ba", hidden, self.w_query)  # [B, A]
        energy = np.einsum("bla,ba->bl", keys, query)  # [B, L]
        attention = np.exp(energy - energy.max(axis=1, keepdims=True))
        attention /= attention.sum(axis=1, keepdims=True)  # [B, L]
        context = np.einsum("bl,ble->be", attention, features)  # [B, E]
        new_hidden = np.tanh(self.embed[token] + np.einsum("bh,hk->bk", hidden, self.w_hidden)
                             + np.einsum("be,eh->bh", context, self.w_context))  # [B, H]
        logits = np.einsum("bh,hv->bv", new_hidden, self.w_out)  # [B, V]
        logits[:, END] += self.end_weight * context[:, 0]
        top = logits.max(axis=1, keepdims=True)
        logprobs = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
        return logprobs.astype(np.float32), new_hidden.astype(np.float32), attention.astype(np.float32)


def encoder_outputs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    return (rng.normal(size=(n, L, E)).astype(np.float32), rng.normal(size=(n, L, A)).astype(np.float32),
            rng.normal(size=(n, H)).astype(np.float32))


def reference_search(step, features, keys, hidden, k, max_length, length_penalty, alternatives):
    """The textbook search for ONE image, with Python lists and no batching.

    Same rules as caption_cli.beam: 2K candidates best first (ties: beam then word),
    <end> among the first K finishes, the first K others run on, stop when K finished
    ones beat the best running sum normalised now, cut at max_length.
    """
    beams = [([], 0.0, hidden, [])]  # (words, sum log-prob, hidden [H], attention rows)
    finished = []  # (score, words, attention rows), best first, at most k

    def finish(words, total, length, rows):
        finished.append((total / length ** length_penalty, words, rows))
        finished.sort(key=lambda f: -f[0])  # stable: an equal later one stays behind
        del finished[k:]

    for t in range(max_length):
        candidates = []
        for index, (words, total, state, rows) in enumerate(beams):
            last = np.array([words[-1] if words else START], dtype=np.int64)
            logprobs, new_state, attention = step(last, state[None], features[None], keys[None])
            for word in range(logprobs.shape[1]):
                if word in BANNED or (t == 0 and word == END):
                    continue
                candidates.append((total + float(logprobs[0, word]), index, word, new_state[0], attention[0]))
        candidates.sort(key=lambda c: -c[0])  # stable, so ties stay in (beam, word) order
        running = []
        for rank, (total, index, word, new_state, attention) in enumerate(candidates[:2 * k]):
            words, _, _, rows = beams[index]
            if word == END:
                if rank < k:
                    finish(words, total, t + 1, rows)
            elif len(running) < k:
                running.append((words + [word], total, new_state, rows + [attention]))
        beams = running
        if t == max_length - 1:
            for words, total, _, rows in beams:
                finish(words, total, t + 1, rows)
            break
        if len(finished) == k and finished[-1][0] >= beams[0][1] / (t + 1) ** length_penalty:
            break
    return finished[:alternatives]


def run_batched(decoder, n, seed, **options):
    features, keys, hidden = encoder_outputs(n, seed)
    return beam_search(decoder, features, keys, hidden, SearchOptions(**options),
                       start_id=START, end_id=END, banned_ids=BANNED)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("beam_size", [1, 2, 3, 5])
@pytest.mark.parametrize("length_penalty", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("n_images", [2, 5])
def test_batched_equals_per_image_reference(seed, beam_size, length_penalty, n_images):
    decoder = FakeDecoder(seed, end_weight=1.5)
    max_length = 8
    found = run_batched(decoder, n_images, seed, beam_size=beam_size, alternatives=beam_size,
                        max_length=max_length, length_penalty=length_penalty)
    features, keys, hidden = encoder_outputs(n_images, seed)
    assert len(found) == n_images
    for image in range(n_images):
        expected = reference_search(decoder, features[image], keys[image], hidden[image], beam_size,
                                    max_length, length_penalty, beam_size)
        got = found[image]
        assert [h.tokens for h in got] == [words for _, words, _ in expected]
        assert [h.score for h in got] == pytest.approx([score for score, _, _ in expected], rel=1e-9, abs=1e-12)
        for hypothesis, (_, words, rows) in zip(got, expected):
            assert hypothesis.attention.dtype == np.float32
            assert hypothesis.attention.shape == (len(words), L)
            np.testing.assert_array_equal(hypothesis.attention, np.array(rows, dtype=np.float32).reshape(-1, L))


class WideDecoder(FakeDecoder):
    """FakeDecoder over 60 words whose favourite words are the banned <pad> and <start>.

    With 7 words the search scores every expansion; with 60 it first keeps each beam's
    best few words, and the banned ones must not crowd out the words that should win.
    """

    WORDS = 60

    def __init__(self, seed: int, end_weight: float = 0.0) -> None:
        super().__init__(seed, end_weight)
        rng = np.random.default_rng(500 + seed)
        self.embed = rng.normal(size=(self.WORDS, H))
        self.w_out = rng.normal(size=(H, self.WORDS)) * 1.5

    def __call__(self, token, hidden, features, keys):
        logprobs, new_hidden, attention = super().__call__(token, hidden, features, keys)
        logits = logprobs.astype(np.float64)
        logits[:, list(BANNED)] += 6.0
        logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return logits.astype(np.float32), new_hidden, attention


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_wide_vocabulary_with_banned_favourites_equals_reference(seed, beam_size):
    decoder = WideDecoder(seed, end_weight=1.5)
    found = run_batched(decoder, 4, seed, beam_size=beam_size, alternatives=beam_size, max_length=8,
                        length_penalty=0.7)
    features, keys, hidden = encoder_outputs(4, seed)
    for image in range(4):
        expected = reference_search(decoder, features[image], keys[image], hidden[image], beam_size, 8, 0.7,
                                    beam_size)
        assert [h.tokens for h in found[image]] == [words for _, words, _ in expected]
        assert [h.score for h in found[image]] == pytest.approx([score for score, _, _ in expected], rel=1e-9)
        assert all(not set(h.tokens) & set(BANNED) for h in found[image])


def test_every_search_emits_words_only():
    found = run_batched(FakeDecoder(5, end_weight=1.5), 5, 5, beam_size=4, alternatives=4,
                        max_length=10, length_penalty=0.7)
    for hypotheses in found:
        assert hypotheses, "every image gets at least one caption"
        for hypothesis in hypotheses:
            assert 1 <= len(hypothesis.tokens) <= 10
            assert not set(hypothesis.tokens) & {PAD, START, END}
        # no duplicate hypotheses: the K identical beams of step 0 are not all expanded
        assert len({tuple(h.tokens) for h in hypotheses}) == len(hypotheses)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("length_penalty", [0.0, 0.7])
def test_beam_one_is_the_greedy_argmax_chain(seed, length_penalty):
    decoder = FakeDecoder(seed, end_weight=1.5)
    features, keys, hidden = encoder_outputs(2, seed)
    found = run_batched(decoder, 2, seed, beam_size=1, alternatives=1, max_length=8, length_penalty=length_penalty)
    for image in range(2):
        words, total, state = [], 0.0, hidden[image][None]
        for t in range(8):
            last = np.array([words[-1] if words else START], dtype=np.int64)
            logprobs, state, _ = decoder(last, state, features[image][None], keys[image][None])
            masked = logprobs[0].astype(np.float64)
            masked[[PAD, START] + ([END] if t == 0 else [])] = -np.inf
            word = int(np.argmax(masked))
            total += masked[word]
            if word == END:
                break
            words.append(word)
        length = len(words) + (word == END)
        [hypothesis] = found[image]
        assert hypothesis.tokens == words
        assert hypothesis.score == pytest.approx(total / length ** length_penalty, rel=1e-12)


def markov_step(table: dict[int, dict[int, float]]):
    """A decoder whose next-word probabilities depend on the previous word only."""
    logs = np.full((V, V), math.log(1e-9))
    for previous, row in table.items():
        for word, p in row.items():
            logs[previous, word] = math.log(p)

    def step(token, hidden, features, keys):
        b = token.shape[0]
        return logs[token].astype(np.float32), hidden, np.full((b, L), 1 / L, dtype=np.float32)

    return step


A_, B_ = 4, 5  # the two real words of the hand-worked example


def test_flat_indices_split_into_beam_and_word_by_hand():
    # step 0: a .6, b .4 -> beams [a, b]
    # step 1: b->a .36, a-><end> .30, a-><unk> .18, a->a .06 ... : both running beams come from
    # different source beams than their rank, and <end> of beam 0 finishes at rank 1.
    step = markov_step({START: {A_: 0.6, B_: 0.4}, A_: {END: 0.5, UNK: 0.3, A_: 0.1, B_: 0.1},
                        B_: {A_: 0.9, B_: 0.05, END: 0.05}, UNK: {END: 1.0}})
    features, keys, hidden = encoder_outputs(2, 0)
    found = beam_search(step, features, keys, hidden,
                        SearchOptions(beam_size=2, alternatives=2, max_length=2, length_penalty=0.0),
                        start_id=START, end_id=END, banned_ids=BANNED)
    for hypotheses in found:
        assert [h.tokens for h in hypotheses] == [[B_, A_], [A_]]
        assert [h.score for h in hypotheses] == pytest.approx([math.log(0.36), math.log(0.30)], rel=1e-6)
    greedy = beam_search(step, features, keys, hidden,
                         SearchOptions(beam_size=1, alternatives=1, max_length=5, length_penalty=0.0),
                         start_id=START, end_id=END, banned_ids=BANNED)
    assert [[h.tokens for h in hs] for hs in greedy] == [[[A_]], [[A_]]]


def test_no_end_after_a_word_that_never_ends_a_caption():
    # "b a" then <end> is the best caption (.9 * .9 * .8); with "a" in no_end_after the search
    # must say one more word after "a", so "b a c" (.9 * .9 * .2 * 1) wins, and no caption,
    # alternatives included, ends on "a".
    c = 6
    step = markov_step({START: {B_: 0.9, A_: 0.1}, B_: {A_: 0.9, END: 0.1}, A_: {END: 0.8, c: 0.2}, c: {END: 1.0}})
    features, keys, hidden = encoder_outputs(2, 0)
    options = SearchOptions(beam_size=3, alternatives=3, max_length=6, length_penalty=0.0)
    plain = beam_search(step, features, keys, hidden, options, start_id=START, end_id=END, banned_ids=BANNED)
    assert plain[0][0].tokens == [B_, A_]
    ruled = beam_search(step, features, keys, hidden, options, start_id=START, end_id=END, banned_ids=BANNED,
                        no_end_after=[A_])
    for hypotheses in ruled:
        assert [h.tokens for h in hypotheses] == [[B_, A_, c], [B_], [A_, c]]
        assert hypotheses[0].score == pytest.approx(math.log(0.9 * 0.9 * 0.2 * 1.0), rel=1e-6)


def test_no_next_after_a_pair_the_training_captions_never_hold():
    # "a b <end>" is the best caption (.9 * .8 * 1); with b banned right after a, the search takes
    # "a c <end>" (.9 * .2 * 1) instead, and no alternative holds "a b" anywhere; "b" itself stays
    # allowed elsewhere ("b a c" is an alternative), and a read-only step output is copied, not written.
    c = 6
    step = markov_step({START: {A_: 0.9, B_: 0.1}, A_: {B_: 0.8, c: 0.2}, B_: {END: 1.0 - 1e-6, A_: 1e-6},
                        c: {END: 1.0}})

    def read_only_step(token, hidden, features, keys):
        logprobs, hidden_out, attention = step(token, hidden, features, keys)
        logprobs.flags.writeable = False
        return logprobs, hidden_out, attention

    features, keys, hidden = encoder_outputs(2, 0)
    options = SearchOptions(beam_size=3, alternatives=3, max_length=6, length_penalty=0.0)
    plain = beam_search(step, features, keys, hidden, options, start_id=START, end_id=END, banned_ids=BANNED)
    assert plain[0][0].tokens == [A_, B_]
    ruled = beam_search(read_only_step, features, keys, hidden, options, start_id=START, end_id=END,
                        banned_ids=BANNED, no_next_after={A_: [B_], c: []})
    for hypotheses in ruled:
        assert hypotheses[0].tokens == [A_, c]
        assert hypotheses[0].score == pytest.approx(math.log(0.9 * 0.2), rel=1e-6)
        assert all((A_, B_) not in zip(h.tokens, h.tokens[1:]) for h in hypotheses)
        assert [B_] in [h.tokens for h in hypotheses]


def test_no_end_after_leaves_other_rows_alone_and_copies_a_read_only_step_output():
    table = {START: {A_: 0.6, B_: 0.4}, A_: {END: 0.7, B_: 0.3}, B_: {END: 0.9, A_: 0.1}}
    plain_step = markov_step(table)

    def read_only_step(token, hidden, features, keys):
        logprobs, hidden_out, attention = plain_step(token, hidden, features, keys)
        logprobs.flags.writeable = False  # as a buffer the runtime does not own
        return logprobs, hidden_out, attention

    features, keys, hidden = encoder_outputs(1, 0)
    options = SearchOptions(beam_size=2, alternatives=2, max_length=5, length_penalty=0.0)
    found = beam_search(read_only_step, features, keys, hidden, options, start_id=START, end_id=END,
                        banned_ids=BANNED, no_end_after=[A_])
    # "b" may still end a caption, "a" may not: [b] (.4 * .9) and [a, b] (.6 * .3 * .9)
    assert [h.tokens for h in found[0]] == [[B_], [A_, B_]]


def test_alternatives_are_the_best_first_prefix():
    all_of_them = run_batched(FakeDecoder(3, end_weight=1.5), 2, 3, beam_size=4, alternatives=4,
                              max_length=8, length_penalty=0.7)
    two = run_batched(FakeDecoder(3, end_weight=1.5), 2, 3, beam_size=4, alternatives=2,
                      max_length=8, length_penalty=0.7)
    for full, short in zip(all_of_them, two):
        assert len(full) == 4 and len(short) == 2
        scores = [h.score for h in full]
        assert scores == sorted(scores, reverse=True)
        assert [(h.tokens, h.score) for h in short] == [(h.tokens, h.score) for h in full[:2]]


@pytest.mark.parametrize("max_length", [1, 3, 6])
def test_max_length_cuts_captions_without_end(max_length):
    decoder = FakeDecoder(7, end_weight=-50.0)  # <end> never wins: channel 0 is shifted positive below
    features, keys, hidden = encoder_outputs(2, 7)
    features[:, :, 0] = np.abs(features[:, :, 0]) + 1.0
    found = beam_search(decoder, features, keys, hidden,
                        SearchOptions(beam_size=3, alternatives=3, max_length=max_length, length_penalty=0.7),
                        start_id=START, end_id=END, banned_ids=BANNED)
    assert len(decoder.rows) == max_length
    for hypotheses in found:
        assert len(hypotheses) == 3
        assert all(len(h.tokens) == max_length for h in hypotheses)


def test_finished_images_leave_the_batch():
    k, max_length = 3, 7
    decoder = FakeDecoder(11, end_weight=40.0)
    features, keys, hidden = encoder_outputs(2, 11)
    features[0, :, 0] = 5.0  # image 0: <end> dominates from step 1 on, it finishes at once
    features[1, :, 0] = -5.0  # image 1: <end> never wins, it runs to max_length
    found = beam_search(decoder, features, keys, hidden,
                        SearchOptions(beam_size=k, alternatives=k, max_length=max_length, length_penalty=0.7),
                        start_id=START, end_id=END, banned_ids=BANNED)
    assert decoder.rows[0] == 2  # step 0: the K beams of an image are one row
    assert decoder.rows[1] == 2 * k
    assert decoder.rows[-1] == k
    assert decoder.rows[1:] == sorted(decoder.rows[1:], reverse=True)
    assert len(decoder.rows) == max_length
    assert all(len(h.tokens) == 1 for h in found[0])
    assert all(len(h.tokens) == max_length for h in found[1])


def test_images_that_finish_first_make_room_without_mixing_up_rows():
    """Finished images in front of running ones: running images move into their slots
    (features and keys too), and each image still gets its own reference captions."""
    k, max_length, n = 3, 7, 7
    decoder = FakeDecoder(12, end_weight=40.0)
    features, keys, hidden = encoder_outputs(n, 12)
    features[0::2, :, 0] = 5.0  # images 0, 2, 4, 6 finish at once
    features[1::2, :, 0] = -5.0  # images 1, 3, 5 run to max_length
    given = features.copy(), keys.copy()
    found = beam_search(decoder, features, keys, hidden,
                        SearchOptions(beam_size=k, alternatives=k, max_length=max_length, length_penalty=0.7),
                        start_id=START, end_id=END, banned_ids=BANNED)
    assert decoder.rows[-1] == 3 * k  # the three long images ran on alone
    np.testing.assert_array_equal(features, given[0])  # the caller's arrays are not touched
    np.testing.assert_array_equal(keys, given[1])
    for image in range(n):
        expected = reference_search(decoder, features[image], keys[image], hidden[image], k, max_length, 0.7, k)
        assert [h.tokens for h in found[image]] == [words for _, words, _ in expected]
        assert [h.score for h in found[image]] == pytest.approx([score for score, _, _ in expected], rel=1e-9)


def test_empty_batch():
    features, keys, hidden = encoder_outputs(0, 0)
    decoder = FakeDecoder(0)
    assert beam_search(decoder, features, keys, hidden, SearchOptions(3, 3, 5, 0.7),
                       start_id=START, end_id=END, banned_ids=BANNED) == []
    assert decoder.rows == []


@pytest.mark.parametrize("kwargs, message", [
    ({"beam_size": 0}, "beam_size must be an integer from 1 to 32, got 0"),
    ({"beam_size": 33}, "beam_size must be an integer from 1 to 32, got 33"),
    ({"beam_size": 2.5}, "beam_size must be an integer from 1 to 32, got 2.5"),
    ({"beam_size": True}, "beam_size must be an integer from 1 to 32, got True"),
    ({"beam_size": 3, "alternatives": 4}, "alternatives must be an integer from 1 to beam_size (3), got 4"),
    ({"beam_size": 3, "alternatives": 0}, "alternatives must be an integer from 1 to beam_size (3), got 0"),
    ({"alternatives": 40}, "alternatives must be an integer from 1 to 32, got 40"),
    ({"max_length": 0}, "max_length must be an integer from 1 to 100 tokens (counting <end>), got 0"),
    ({"length_penalty": -0.5}, "length_penalty must be a number from 0.0 to 2.0"),
    ({"length_penalty": float("nan")}, "length_penalty must be a number from 0.0 to 2.0"),
    ({"length_penalty": "0.7"}, "length_penalty must be a number from 0.0 to 2.0"),
])
def test_options_are_checked_at_construction(kwargs, message):
    with pytest.raises(SearchOptionsError) as raised:
        SearchOptions(**kwargs)
    assert message in str(raised.value)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, CaptionCliError)
    assert "\n" not in str(raised.value)


def test_options_are_frozen_and_resolve_from_defaults():
    bundle_defaults = SearchOptions(beam_size=3, alternatives=3, max_length=20, length_penalty=0.7)
    options = SearchOptions(beam_size=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.beam_size = 2  # type: ignore[misc]
    assert not options.complete
    # the default number of alternatives follows a smaller beam instead of failing
    assert options.resolved(bundle_defaults) == SearchOptions(1, 1, 20, 0.7)
    assert SearchOptions().resolved(bundle_defaults) == bundle_defaults
    assert SearchOptions(beam_size=5, length_penalty=0.0).resolved(bundle_defaults) == SearchOptions(5, 3, 20, 0.0)
    with pytest.raises(SearchOptionsError, match=r"alternatives must be an integer from 1 to beam_size \(3\)"):
        SearchOptions(alternatives=5).resolved(bundle_defaults)
    with pytest.raises(SearchOptionsError, match="complete options"):
        beam_search(FakeDecoder(0), *encoder_outputs(1, 0), SearchOptions(beam_size=2),
                    start_id=START, end_id=END, banned_ids=BANNED)


def test_nbest_keeps_the_best_and_earlier_ties():
    holder = NBest(2, length_penalty=1.0)
    holder.add([4], -2.0, 2, np.zeros((1, L), np.float32))  # -1.0
    holder.add([5], -1.0, 2, np.zeros((1, L), np.float32))  # -0.5
    holder.add([6], -2.0, 2, np.zeros((1, L), np.float32))  # -1.0, ties the worst: stays out
    holder.add([4, 4], -0.9, 3, np.zeros((2, L), np.float32))  # -0.3
    assert [(h.tokens, h.score) for h in holder.hypotheses] == [([4, 4], -0.3), ([5], -0.5)]
    assert holder.cannot_improve(-1.5, 3)  # -0.5 >= -0.5
    assert not holder.cannot_improve(-1.4, 3)
    assert holder.cannot_improve(-math.inf, 3)
