package spo3;

import java.lang.reflect.Array;
import java.lang.reflect.Field;
import java.lang.reflect.Modifier;
import java.util.ArrayList;
import java.util.IdentityHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;

import sun.misc.Unsafe;
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

    // --- snapshots: a deep copy of the game's object graph -------------------------------

    private static final Unsafe UNSAFE = unsafe();
    private static final Map<Class<?>, List<Field>> FIELDS = new ConcurrentHashMap<>();

    private static Unsafe unsafe() {
        try {
            Field f = Unsafe.class.getDeclaredField("theUnsafe");
            f.setAccessible(true);
            return (Unsafe) f.get(null);
        } catch (ReflectiveOperationException e) {
            throw new IllegalStateException(e);
        }
    }

    /** Snapshots kept in the JVM by id, per game instance (the adapter clears them on reset). */
    private static final Map<PythonInterface, Map<Long, Object[]>> SAVED =
            java.util.Collections.synchronizedMap(new java.util.WeakHashMap<>());
    private static final java.util.concurrent.atomic.AtomicLong NEXT_ID = new java.util.concurrent.atomic.AtomicLong();

    private static Map<Long, Object[]> saved(PythonInterface game) {
        return SAVED.computeIfAbsent(game, k -> new ConcurrentHashMap<>());
    }

    /** Copy the game and its last step; returns the snapshot's id (-1 when `max` are kept already). */
    public static long save(PythonInterface game, int max) {
        Map<Long, Object[]> kept = saved(game);
        if (kept.size() >= max) {
            return -1;
        }
        IdentityHashMap<Object, Object> seen = new IdentityHashMap<>();
        long id = NEXT_ID.incrementAndGet();
        kept.put(id, new Object[] {copy(game.game(), seen), copy(game.curStepResult(), seen)});
        return id;
    }

    /** Put a copy of snapshot `id` back into `game` (the snapshot stays reusable). */
    public static void restore(PythonInterface game, long id) {
        Object[] snapshot = saved(game).get(id);
        if (snapshot == null) {
            throw new IllegalArgumentException("no snapshot " + id + " (released by a reset?)");
        }
        IdentityHashMap<Object, Object> seen = new IdentityHashMap<>();
        game.game_$eq((textworldexpress.struct.TextGame) copy(snapshot[0], seen));
        game.curStepResult_$eq((textworldexpress.struct.StepResult) copy(snapshot[1], seen));
    }

    /**
     * Restore snapshot `from` (unless it is -1: step from the current state), step `action` and, if
     * the episode goes on and `max` allows, save the new state: "id NUL json" in one call.
     */
    public static String stepFrom(PythonInterface game, long from, String action, int max) {
        if (from >= 0) {
            restore(game, from);
        }
        String json = game.stepJSON(action);
        long id = game.getCompleted() ? -1 : save(game, max);
        return id + "\0" + json;
    }

    /** Forget every snapshot of `game`; returns how many there were. */
    public static int clear(PythonInterface game) {
        Map<Long, Object[]> kept = SAVED.remove(game);
        return kept == null ? 0 : kept.size();
    }

    private static final Map<Class<?>, Boolean> SHARED = new ConcurrentHashMap<>();

    /** Shared, not copied: immutable values, classes, Scala singleton objects, lambdas, generators. */
    private static boolean shared(Class<?> c) {
        return SHARED.computeIfAbsent(c, TwxReplay::isShared);
    }

    private static boolean isShared(Class<?> c) {
        if (c == String.class || c == Class.class || Number.class.isAssignableFrom(c) || c == Boolean.class
                || c == Character.class || c.isEnum() || c.isHidden() || c.isSynthetic()) {
            return true;
        }
        String name = c.getName();
        if (name.contains("$$Lambda") || name.startsWith("textworldexpress.generator.")
                || name.equals("textworldexpress.runtime.PythonInterface")) {
            return true;
        }
        if (name.endsWith("$")) {  // a Scala `object`: one instance, compared by identity
            try {
                c.getDeclaredField("MODULE$");
                return true;
            } catch (NoSuchFieldException e) {
                return false;
            }
        }
        return false;
    }

    private static List<Field> fields(Class<?> c) {
        return FIELDS.computeIfAbsent(c, k -> {
            List<Field> out = new ArrayList<>();
            for (Class<?> x = k; x != null; x = x.getSuperclass()) {
                for (Field f : x.getDeclaredFields()) {
                    if (!Modifier.isStatic(f.getModifiers())) {
                        out.add(f);
                    }
                }
            }
            return out;
        });
    }

    private static Object copy(Object o, IdentityHashMap<Object, Object> seen) {
        if (o == null) {
            return null;
        }
        Class<?> c = o.getClass();
        if (shared(c)) {
            return o;
        }
        Object done = seen.get(o);
        if (done != null) {
            return done;
        }
        if (c.isArray()) {
            int n = Array.getLength(o);
            Object a = Array.newInstance(c.getComponentType(), n);
            seen.put(o, a);
            if (c.getComponentType().isPrimitive()) {
                System.arraycopy(o, 0, a, 0, n);
            } else {
                Object[] src = (Object[]) o;
                Object[] dst = (Object[]) a;
                for (int i = 0; i < n; i++) {
                    dst[i] = copy(src[i], seen);
                }
            }
            return a;
        }
        Object n;
        try {
            n = UNSAFE.allocateInstance(c);
        } catch (InstantiationException e) {
            throw new IllegalStateException("cannot copy " + c.getName(), e);
        }
        seen.put(o, n);
        for (Field f : fields(c)) {
            long off = UNSAFE.objectFieldOffset(f);
            Class<?> t = f.getType();
            if (!t.isPrimitive()) {
                UNSAFE.putObject(n, off, copy(UNSAFE.getObject(o, off), seen));
            } else if (t == int.class) {
                UNSAFE.putInt(n, off, UNSAFE.getInt(o, off));
            } else if (t == long.class) {
                UNSAFE.putLong(n, off, UNSAFE.getLong(o, off));
            } else if (t == double.class) {
                UNSAFE.putDouble(n, off, UNSAFE.getDouble(o, off));
            } else if (t == boolean.class) {
                UNSAFE.putBoolean(n, off, UNSAFE.getBoolean(o, off));
            } else if (t == float.class) {
                UNSAFE.putFloat(n, off, UNSAFE.getFloat(o, off));
            } else if (t == byte.class) {
                UNSAFE.putByte(n, off, UNSAFE.getByte(o, off));
            } else if (t == short.class) {
                UNSAFE.putShort(n, off, UNSAFE.getShort(o, off));
            } else {
                UNSAFE.putChar(n, off, UNSAFE.getChar(o, off));
            }
        }
        return n;
    }
}
