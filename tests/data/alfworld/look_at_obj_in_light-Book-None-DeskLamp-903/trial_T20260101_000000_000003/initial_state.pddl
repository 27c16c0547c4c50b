;; Hand-written ALFWorld game (same format as ALFWorld's json_2.1.1 initial_state.pddl files):
;; a small bedroom with a bed, a desk, a drawer and a side table. Task: look at a book under the
;; desk lamp.
(define (problem plan_trial_T20260101_000000_000003)
(:domain alfred)
(:objects
        agent1 - agent
        BookType - otype
        DeskLampType - otype
        PenType - otype
        CellPhoneType - otype
        BedType - rtype
        DeskType - rtype
        DrawerType - rtype
        SideTableType - rtype
        Book_bar__plus_01_dot_30_bar__plus_00_dot_56_bar__plus_00_dot_90 - object
        DeskLamp_bar__minus_01_dot_75_bar__plus_00_dot_87_bar__plus_00_dot_70 - object
        Pen_bar__minus_01_dot_60_bar__plus_00_dot_45_bar__plus_00_dot_72 - object
        CellPhone_bar__plus_02_dot_10_bar__plus_00_dot_66_bar__minus_01_dot_30 - object
        Bed_bar__plus_01_dot_20_bar__plus_00_dot_00_bar__plus_01_dot_10 - receptacle
        Desk_bar__minus_01_dot_70_bar__plus_00_dot_00_bar__plus_00_dot_65 - receptacle
        Drawer_bar__minus_01_dot_65_bar__plus_00_dot_40_bar__plus_00_dot_70 - receptacle
        SideTable_bar__plus_02_dot_15_bar__plus_00_dot_00_bar__minus_01_dot_35 - receptacle
        loc_bar_1_bar__minus_1_bar_0_bar_30 - location
        loc_bar_2_bar_4_bar_1_bar_45 - location
        loc_bar__minus_5_bar_3_bar_3_bar_45 - location
        loc_bar__minus_4_bar_2_bar_3_bar_60 - location
        loc_bar_7_bar__minus_5_bar_1_bar_45 - location
        )

(:init
        (atLocation agent1 loc_bar_1_bar__minus_1_bar_0_bar_30)

        (receptacleType Bed_bar__plus_01_dot_20_bar__plus_00_dot_00_bar__plus_01_dot_10 BedType)
        (receptacleType Desk_bar__minus_01_dot_70_bar__plus_00_dot_00_bar__plus_00_dot_65 DeskType)
        (receptacleType Drawer_bar__minus_01_dot_65_bar__plus_00_dot_40_bar__plus_00_dot_70 DrawerType)
        (receptacleType SideTable_bar__plus_02_dot_15_bar__plus_00_dot_00_bar__minus_01_dot_35 SideTableType)
        (objectType Book_bar__plus_01_dot_30_bar__plus_00_dot_56_bar__plus_00_dot_90 BookType)
        (objectType DeskLamp_bar__minus_01_dot_75_bar__plus_00_dot_87_bar__plus_00_dot_70 DeskLampType)
        (objectType Pen_bar__minus_01_dot_60_bar__plus_00_dot_45_bar__plus_00_dot_72 PenType)
        (objectType CellPhone_bar__plus_02_dot_10_bar__plus_00_dot_66_bar__minus_01_dot_30 CellPhoneType)

        (canContain BedType BookType)
        (canContain BedType CellPhoneType)
        (canContain DeskType BookType)
        (canContain DeskType PenType)
        (canContain DeskType CellPhoneType)
        (canContain DrawerType BookType)
        (canContain DrawerType PenType)
        (canContain DrawerType CellPhoneType)
        (canContain SideTableType BookType)
        (canContain SideTableType PenType)
        (canContain SideTableType CellPhoneType)

        (pickupable Book_bar__plus_01_dot_30_bar__plus_00_dot_56_bar__plus_00_dot_90)
        (pickupable Pen_bar__minus_01_dot_60_bar__plus_00_dot_45_bar__plus_00_dot_72)
        (pickupable CellPhone_bar__plus_02_dot_10_bar__plus_00_dot_66_bar__minus_01_dot_30)
        (toggleable DeskLamp_bar__minus_01_dot_75_bar__plus_00_dot_87_bar__plus_00_dot_70)

        (openable Drawer_bar__minus_01_dot_65_bar__plus_00_dot_40_bar__plus_00_dot_70)

        (inReceptacle Book_bar__plus_01_dot_30_bar__plus_00_dot_56_bar__plus_00_dot_90 Bed_bar__plus_01_dot_20_bar__plus_00_dot_00_bar__plus_01_dot_10)
        (inReceptacle DeskLamp_bar__minus_01_dot_75_bar__plus_00_dot_87_bar__plus_00_dot_70 Desk_bar__minus_01_dot_70_bar__plus_00_dot_00_bar__plus_00_dot_65)
        (inReceptacle Pen_bar__minus_01_dot_60_bar__plus_00_dot_45_bar__plus_00_dot_72 Drawer_bar__minus_01_dot_65_bar__plus_00_dot_40_bar__plus_00_dot_70)
        (inReceptacle CellPhone_bar__plus_02_dot_10_bar__plus_00_dot_66_bar__minus_01_dot_30 SideTable_bar__plus_02_dot_15_bar__plus_00_dot_00_bar__minus_01_dot_35)

        (receptacleAtLocation Bed_bar__plus_01_dot_20_bar__plus_00_dot_00_bar__plus_01_dot_10 loc_bar_2_bar_4_bar_1_bar_45)
        (receptacleAtLocation Desk_bar__minus_01_dot_70_bar__plus_00_dot_00_bar__plus_00_dot_65 loc_bar__minus_5_bar_3_bar_3_bar_45)
        (receptacleAtLocation Drawer_bar__minus_01_dot_65_bar__plus_00_dot_40_bar__plus_00_dot_70 loc_bar__minus_4_bar_2_bar_3_bar_60)
        (receptacleAtLocation SideTable_bar__plus_02_dot_15_bar__plus_00_dot_00_bar__minus_01_dot_35 loc_bar_7_bar__minus_5_bar_1_bar_45)
        (objectAtLocation Book_bar__plus_01_dot_30_bar__plus_00_dot_56_bar__plus_00_dot_90 loc_bar_2_bar_4_bar_1_bar_45)
        (objectAtLocation DeskLamp_bar__minus_01_dot_75_bar__plus_00_dot_87_bar__plus_00_dot_70 loc_bar__minus_5_bar_3_bar_3_bar_45)
        (objectAtLocation Pen_bar__minus_01_dot_60_bar__plus_00_dot_45_bar__plus_00_dot_72 loc_bar__minus_4_bar_2_bar_3_bar_60)
        (objectAtLocation CellPhone_bar__plus_02_dot_10_bar__plus_00_dot_66_bar__minus_01_dot_30 loc_bar_7_bar__minus_5_bar_1_bar_45)
        )

        (:goal
             (and
                 (exists (?ot - object
                          ?r - receptacle
                          ?a - agent
                          ?l - location)
                     (and
                         (objectType ?ot DeskLampType)
                         (toggleable ?ot)
                         (isToggled ?ot)
                         (receptacleAtLocation ?r ?l)
                         (atLocation ?a ?l)
                         (inReceptacle ?ot ?r)
                     )
                 )
                 (exists (?o - object
                          ?a - agent)
                     (and
                         (objectType ?o BookType)
                         (holds ?a ?o)
                     )
                 )
             )
        )
    )
