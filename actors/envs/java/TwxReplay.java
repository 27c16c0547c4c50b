package spo3;

import textworldexpress.runtime.PythonInterface;

/**
 * Reset + replay of a TextWorld-Express game inside the JVM: one Py4J call instead of one per
 * action (actors/envs/twx_env.py compiles this file once per machine when a JDK is there).
 */
public final class TwxReplay {
    private TwxReplay() {}

    /**
     * Generate game (seed, fold) again and apply `actions` (separated by newlines; empty: none).
     * Returns the JSON of the last step, or of the new game when there is no action.
     */
    public static String replay(PythonInterface game, int seed, String fold, String actions) {
        if (actions.isEmpty()) {
            return game.generateNewGameJSON(seed, fold, false);
        }
        game.generateNewGame(seed, fold, false);
        String[] list = actions.split("\n", -1);
        for (int i = 0; i < list.length - 1; i++) {
            game.step(list[i]);
        }
        return game.stepJSON(list[list.length - 1]);
    }

    /**
     * replay(game, seed, fold, prefix), then step `action`: the JSON of the prefix's end and the JSON
     * of the new step, separated by a NUL character. A new step from any node in one call.
     */
    public static String replayStep(PythonInterface game, int seed, String fold, String prefix, String action) {
        String before = replay(game, seed, fold, prefix);
        return before + "\0" + game.stepJSON(action);
    }
}
