;; Hand-written ALFWorld game (same format as ALFWorld's json_2.1.1 initial_state.pddl files):
;; a small kitchen with a countertop (two apples on it), a fridge and a cabinet. Task: put an apple in the fridge.
(define (problem plan_trial_T20260101_000000_000004)
(:domain alfred)
(:objects
        agent1 - agent
        AppleType - otype
        EggType - otype
        MugType - otype
        CounterTopType - rtype
        FridgeType - rtype
        CabinetType - rtype
        Apple_bar__plus_01_dot_10_bar__plus_00_dot_95_bar__minus_01_dot_20 - object
        Apple_bar__plus_01_dot_30_bar__plus_00_dot_95_bar__minus_01_dot_10 - object
        Egg_bar__minus_02_dot_05_bar__plus_00_dot_80_bar__plus_01_dot_10 - object
        Mug_bar__plus_00_dot_45_bar__plus_02_dot_05_bar__minus_01_dot_55 - object
        CounterTop_bar__plus_01_dot_00_bar__plus_00_dot_90_bar__minus_01_dot_25 - receptacle
        Fridge_bar__minus_02_dot_00_bar__plus_00_dot_00_bar__plus_01_dot_00 - receptacle
        Cabinet_bar__plus_00_dot_50_bar__plus_02_dot_00_bar__minus_01_dot_50 - receptacle
        loc_bar_0_bar_0_bar_0_bar_30 - location
        loc_bar_4_bar__minus_3_bar_2_bar_45 - location
        loc_bar__minus_6_bar_4_bar_3_bar_60 - location
        loc_bar_2_bar__minus_5_bar_2_bar_0 - location
        )

(:init
        (atLocation agent1 loc_bar_0_bar_0_bar_0_bar_30)

        (receptacleType CounterTop_bar__plus_01_dot_00_bar__plus_00_dot_90_bar__minus_01_dot_25 CounterTopType)
        (receptacleType Fridge_bar__minus_02_dot_00_bar__plus_00_dot_00_bar__plus_01_dot_00 FridgeType)
        (receptacleType Cabinet_bar__plus_00_dot_50_bar__plus_02_dot_00_bar__minus_01_dot_50 CabinetType)
        (objectType Apple_bar__plus_01_dot_10_bar__plus_00_dot_95_bar__minus_01_dot_20 AppleType)
        (objectType Apple_bar__plus_01_dot_30_bar__plus_00_dot_95_bar__minus_01_dot_10 AppleType)
        (objectType Egg_bar__minus_02_dot_05_bar__plus_00_dot_80_bar__plus_01_dot_10 EggType)
        (objectType Mug_bar__plus_00_dot_45_bar__plus_02_dot_05_bar__minus_01_dot_55 MugType)

        (canContain CounterTopType AppleType)
        (canContain CounterTopType EggType)
        (canContain CounterTopType MugType)
        (canContain FridgeType AppleType)
        (canContain FridgeType EggType)
        (canContain FridgeType MugType)
        (canContain CabinetType MugType)

        (pickupable Apple_bar__plus_01_dot_10_bar__plus_00_dot_95_bar__minus_01_dot_20)
        (pickupable Apple_bar__plus_01_dot_30_bar__plus_00_dot_95_bar__minus_01_dot_10)
        (pickupable Egg_bar__minus_02_dot_05_bar__plus_00_dot_80_bar__plus_01_dot_10)
        (pickupable Mug_bar__plus_00_dot_45_bar__plus_02_dot_05_bar__minus_01_dot_55)
        (isReceptacleObject Mug_bar__plus_00_dot_45_bar__plus_02_dot_05_bar__minus_01_dot_55)
        (heatable Apple_bar__plus_01_dot_10_bar__plus_00_dot_95_bar__minus_01_dot_20)
        (heatable Apple_bar__plus_01_dot_30_bar__plus_00_dot_95_bar__minus_01_dot_10)
        (coolable Apple_bar__plus_01_dot_10_bar__plus_00_dot_95_bar__minus_01_dot_20)
        (coolable Apple_bar__plus_01_dot_30_bar__plus_00_dot_95_bar__minus_01_dot_10)
        (sliceable Apple_bar__plus_01_dot_10_bar__plus_00_dot_95_bar__minus_01_dot_20)
        (sliceable Apple_bar__plus_01_dot_30_bar__plus_00_dot_95_bar__minus_01_dot_10)
        (heatable Egg_bar__minus_02_dot_05_bar__plus_00_dot_80_bar__plus_01_dot_10)
        (coolable Egg_bar__minus_02_dot_05_bar__plus_00_dot_80_bar__plus_01_dot_10)
        (sliceable Egg_bar__minus_02_dot_05_bar__plus_00_dot_80_bar__plus_01_dot_10)
        (cleanable Mug_bar__plus_00_dot_45_bar__plus_02_dot_05_bar__minus_01_dot_55)
        (heatable Mug_bar__plus_00_dot_45_bar__plus_02_dot_05_bar__minus_01_dot_55)
        (coolable Mug_bar__plus_00_dot_45_bar__plus_02_dot_05_bar__minus_01_dot_55)

        (openable Fridge_bar__minus_02_dot_00_bar__plus_00_dot_00_bar__plus_01_dot_00)
        (openable Cabinet_bar__plus_00_dot_50_bar__plus_02_dot_00_bar__minus_01_dot_50)

        (inReceptacle Apple_bar__plus_01_dot_10_bar__plus_00_dot_95_bar__minus_01_dot_20 CounterTop_bar__plus_01_dot_00_bar__plus_00_dot_90_bar__minus_01_dot_25)
        (inReceptacle Apple_bar__plus_01_dot_30_bar__plus_00_dot_95_bar__minus_01_dot_10 CounterTop_bar__plus_01_dot_00_bar__plus_00_dot_90_bar__minus_01_dot_25)
        (inReceptacle Egg_bar__minus_02_dot_05_bar__plus_00_dot_80_bar__plus_01_dot_10 Fridge_bar__minus_02_dot_00_bar__plus_00_dot_00_bar__plus_01_dot_00)
        (inReceptacle Mug_bar__plus_00_dot_45_bar__plus_02_dot_05_bar__minus_01_dot_55 Cabinet_bar__plus_00_dot_50_bar__plus_02_dot_00_bar__minus_01_dot_50)

        (receptacleAtLocation CounterTop_bar__plus_01_dot_00_bar__plus_00_dot_90_bar__minus_01_dot_25 loc_bar_4_bar__minus_3_bar_2_bar_45)
        (receptacleAtLocation Fridge_bar__minus_02_dot_00_bar__plus_00_dot_00_bar__plus_01_dot_00 loc_bar__minus_6_bar_4_bar_3_bar_60)
        (receptacleAtLocation Cabinet_bar__plus_00_dot_50_bar__plus_02_dot_00_bar__minus_01_dot_50 loc_bar_2_bar__minus_5_bar_2_bar_0)
        (objectAtLocation Apple_bar__plus_01_dot_10_bar__plus_00_dot_95_bar__minus_01_dot_20 loc_bar_4_bar__minus_3_bar_2_bar_45)
        (objectAtLocation Apple_bar__plus_01_dot_30_bar__plus_00_dot_95_bar__minus_01_dot_10 loc_bar_4_bar__minus_3_bar_2_bar_45)
        (objectAtLocation Egg_bar__minus_02_dot_05_bar__plus_00_dot_80_bar__plus_01_dot_10 loc_bar__minus_6_bar_4_bar_3_bar_60)
        (objectAtLocation Mug_bar__plus_00_dot_45_bar__plus_02_dot_05_bar__minus_01_dot_55 loc_bar_2_bar__minus_5_bar_2_bar_0)
        )

        (:goal
            (and
                (exists (?r - receptacle)
                    (exists (?o - object)
                        (and
                            (inReceptacle ?o ?r)
                            (objectType ?o AppleType)
                            (receptacleType ?r FridgeType)
                        )
                    )
                )
            )
        )
    )
